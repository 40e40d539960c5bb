//! NuPIC's `DateEncoder`: calendar features of a timestamp, each through its own
//! [`ScalarEncoder`], laid end to end in NuPIC's order (season, day of week, weekend, time of
//! day).
//!
//! Timestamps are seconds since 1970-01-01T00:00 read as the record's *local* wall-clock time:
//! no time zone is applied, so "09:00" in the data is 09:00 here.

use super::scalar::{ScalarEncoder, ScalarParams};
use super::{write_sdr, EncoderError};
use crate::sdr::Sdr;
use chrono::{Datelike, Timelike};
use serde::{Deserialize, Serialize};

/// A periodic calendar field: `width` active bits, `radius` in the field's unit (hours for
/// time of day, days for day of week and season).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeriodicFieldParams {
    /// Active bits (NuPIC `w`, odd).
    pub width: u32,
    /// Inputs this far apart get non-overlapping encodings.
    pub radius: f64,
}

/// The weekend flag: `width` active bits, two non-overlapping buckets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeekendParams {
    /// Active bits (NuPIC `w`, odd).
    pub width: u32,
}

/// Which calendar features to encode. `None` disables a feature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DateParams {
    /// Hour of day in `[0, 24)` with minutes as a fraction (seconds ignored, as in NuPIC).
    pub time_of_day: Option<PeriodicFieldParams>,
    /// Day of week in `[0, 7)`, Monday = 0, plus the fraction of the day elapsed.
    pub day_of_week: Option<PeriodicFieldParams>,
    /// Saturday, Sunday or Friday after 18:00 (NuPIC's definition) versus the rest.
    pub weekend: Option<WeekendParams>,
    /// Day of year in `[0, 366)`, 0 = 1 January.
    pub season: Option<PeriodicFieldParams>,
}

impl Default for DateParams {
    /// NAB's date encoding: time of day only, 21 bits, radius 9.49 hours.
    fn default() -> Self {
        DateParams {
            time_of_day: Some(PeriodicFieldParams {
                width: 21,
                radius: 9.49,
            }),
            day_of_week: None,
            weekend: None,
            season: None,
        }
    }
}

impl DateParams {
    /// Checks every enabled feature (the same checks [`DateEncoder::new`] makes).
    pub fn validate(&self) -> Result<(), EncoderError> {
        DateEncoder::new(self).map(|_| ())
    }
}

/// Builds one sub-encoder, renaming its parameter errors to `field.width` / `field.radius`.
fn sub_encoder(
    field: &str,
    width: u32,
    maxval: f64,
    periodic: bool,
    radius: f64,
) -> Result<ScalarEncoder, EncoderError> {
    ScalarEncoder::new(ScalarParams {
        w: width,
        minval: 0.0,
        maxval,
        periodic,
        n: 0,
        radius,
        resolution: 0.0,
        clip_input: false,
    })
    .map_err(|e| match e {
        EncoderError::InvalidParam {
            param,
            value,
            reason,
        } => {
            let inner = match param.as_str() {
                "w" => "width",
                "radius" | "n/radius/resolution" => "radius",
                other => other,
            };
            EncoderError::InvalidParam {
                param: format!("{field}.{inner}"),
                value,
                reason,
            }
        }
        other => other,
    })
}

/// NuPIC's `DateEncoder` restricted to season, day of week, weekend and time of day.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DateEncoder {
    season: Option<ScalarEncoder>,
    day_of_week: Option<ScalarEncoder>,
    weekend: Option<ScalarEncoder>,
    time_of_day: Option<ScalarEncoder>,
    size: usize,
}

impl DateEncoder {
    /// Builds the enabled sub-encoders with NuPIC's ranges.
    pub fn new(params: &DateParams) -> Result<Self, EncoderError> {
        let periodic = |field, p: &Option<PeriodicFieldParams>, maxval| {
            p.as_ref()
                .map(|p| sub_encoder(field, p.width, maxval, true, p.radius))
                .transpose()
        };
        let season = periodic("season", &params.season, 366.0)?;
        let day_of_week = periodic("day_of_week", &params.day_of_week, 7.0)?;
        let weekend = params
            .weekend
            .as_ref()
            .map(|p| sub_encoder("weekend", p.width, 1.0, false, 1.0))
            .transpose()?;
        let time_of_day = periodic("time_of_day", &params.time_of_day, 24.0)?;
        let size = [&season, &day_of_week, &weekend, &time_of_day]
            .iter()
            .filter_map(|e| e.as_ref().map(ScalarEncoder::size))
            .sum();
        Ok(DateEncoder {
            season,
            day_of_week,
            weekend,
            time_of_day,
            size,
        })
    }

    /// Number of output bits (0 when every feature is disabled).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Encodes `timestamp` into `out` (resized to [`size`](Self::size) if needed).
    pub fn encode(&self, timestamp: i64, out: &mut Sdr) -> Result<(), EncoderError> {
        let mut bits = Vec::new();
        self.encode_into(timestamp, 0, &mut bits)?;
        write_sdr(out, self.size, &bits);
        Ok(())
    }

    /// Appends the sorted active bits, shifted by `offset`, to `buf`; on error nothing is
    /// appended. Fails only for timestamps beyond chrono's calendar (±262 000 years).
    pub(crate) fn encode_into(
        &self,
        timestamp: i64,
        offset: u32,
        buf: &mut Vec<u32>,
    ) -> Result<(), EncoderError> {
        if self.size == 0 {
            return Ok(());
        }
        let t = chrono::DateTime::from_timestamp(timestamp, 0)
            .ok_or(EncoderError::Timestamp(timestamp))?
            .naive_utc();
        let time_of_day = f64::from(t.hour()) + f64::from(t.minute()) / 60.0;
        let weekday = t.weekday().num_days_from_monday();
        let weekend = weekday >= 5 || (weekday == 4 && time_of_day > 18.0);
        let fields = [
            (&self.season, f64::from(t.ordinal0())),
            (&self.day_of_week, f64::from(weekday) + time_of_day / 24.0),
            (&self.weekend, if weekend { 1.0 } else { 0.0 }),
            (&self.time_of_day, time_of_day),
        ];
        let start = buf.len();
        let mut at = offset;
        for (encoder, value) in fields {
            if let Some(e) = encoder {
                // Every value is inside its encoder's range by construction; the error arm
                // is kept so a future field cannot leave half an encoding behind.
                if let Err(err) = e.encode_into(value, at, buf) {
                    buf.truncate(start);
                    return Err(err);
                }
                at += e.size() as u32;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdr::sorted_intersection_len;

    /// 2024-01-06 was a Saturday.
    const SAT_2024_01_06: i64 = 1_704_499_200;
    const DAY: i64 = 86_400;
    const HOUR: i64 = 3_600;

    fn bits(e: &DateEncoder, ts: i64) -> Vec<u32> {
        let mut out = Sdr::default();
        e.encode(ts, &mut out).unwrap();
        assert_eq!(out.size(), e.size());
        out.sparse().to_vec()
    }

    #[test]
    fn default_is_nab_time_of_day_with_54_bits() {
        let e = DateEncoder::new(&DateParams::default()).unwrap();
        assert_eq!(e.size(), 54);
        let midnight = bits(&e, SAT_2024_01_06);
        let late = bits(&e, SAT_2024_01_06 + 23 * HOUR + 59 * 60);
        let noon = bits(&e, SAT_2024_01_06 + 12 * HOUR);
        assert_eq!(midnight.len(), 21);
        assert!(sorted_intersection_len(&midnight, &late) >= 19);
        assert_eq!(sorted_intersection_len(&midnight, &noon), 0);
        // Seconds are ignored, like NuPIC; the date is irrelevant to this feature.
        assert_eq!(bits(&e, SAT_2024_01_06 + 59), midnight);
        assert_eq!(bits(&e, SAT_2024_01_06 + 3 * DAY), midnight);
    }

    #[test]
    fn weekend_flag_follows_nupic() {
        let e = DateEncoder::new(&DateParams {
            time_of_day: None,
            weekend: Some(WeekendParams { width: 21 }),
            ..DateParams::default()
        })
        .unwrap();
        assert_eq!(e.size(), 42);
        let on: Vec<u32> = (21..42).collect();
        let off: Vec<u32> = (0..21).collect();
        assert_eq!(bits(&e, SAT_2024_01_06 + 10 * HOUR), on);
        assert_eq!(bits(&e, SAT_2024_01_06 + DAY + 23 * HOUR), on, "Sunday");
        assert_eq!(bits(&e, SAT_2024_01_06 + 2 * DAY), off, "Monday");
        assert_eq!(bits(&e, SAT_2024_01_06 - 4 * DAY), off, "Tuesday");
        assert_eq!(bits(&e, SAT_2024_01_06 - DAY + 17 * HOUR), off, "Fri 17h");
        assert_eq!(bits(&e, SAT_2024_01_06 - DAY + 19 * HOUR), on, "Fri 19h");
    }

    #[test]
    fn day_of_week_starts_monday_and_wraps() {
        let p = PeriodicFieldParams {
            width: 21,
            radius: 1.0,
        };
        let e = DateEncoder::new(&DateParams {
            time_of_day: None,
            day_of_week: Some(p.clone()),
            ..DateParams::default()
        })
        .unwrap();
        let scalar = sub_encoder("day_of_week", 21, 7.0, true, 1.0).unwrap();
        let expect = |v: f64| {
            let mut out = Sdr::default();
            scalar.encode(v, &mut out).unwrap();
            out.sparse().to_vec()
        };
        // 1970-01-01 was a Thursday (3); 1969-12-31 23:59:59 a Wednesday.
        assert_eq!(bits(&e, 0), expect(3.0));
        assert_eq!(bits(&e, 6 * HOUR), expect(3.25));
        assert_eq!(bits(&e, -1), expect(2.0 + (23.0 + 59.0 / 60.0) / 24.0));
        let monday = SAT_2024_01_06 + 2 * DAY;
        assert_eq!(bits(&e, monday), expect(0.0));
        let sunday_late = bits(&e, monday - 60);
        assert!(sorted_intersection_len(&bits(&e, monday), &sunday_late) >= 19);
    }

    #[test]
    fn season_is_day_of_year_and_wraps_at_new_year() {
        let e = DateEncoder::new(&DateParams {
            time_of_day: None,
            season: Some(PeriodicFieldParams {
                width: 21,
                radius: 91.5,
            }),
            ..DateParams::default()
        })
        .unwrap();
        let jan1 = SAT_2024_01_06 - 5 * DAY;
        let dec31 = jan1 - DAY;
        let jul1 = jan1 + 182 * DAY;
        assert!(sorted_intersection_len(&bits(&e, jan1), &bits(&e, dec31)) >= 19);
        assert_eq!(sorted_intersection_len(&bits(&e, jan1), &bits(&e, jul1)), 0);
    }

    #[test]
    fn all_features_concatenate_in_nupic_order() {
        let f = |width, radius| Some(PeriodicFieldParams { width, radius });
        let params = DateParams {
            time_of_day: f(21, 9.49),
            day_of_week: f(11, 1.0),
            weekend: Some(WeekendParams { width: 5 }),
            season: f(7, 91.5),
        };
        let e = DateEncoder::new(&params).unwrap();
        let sizes = [
            sub_encoder("s", 7, 366.0, true, 91.5).unwrap().size(),
            sub_encoder("d", 11, 7.0, true, 1.0).unwrap().size(),
            10,
            54,
        ];
        assert_eq!(e.size(), sizes.iter().sum::<usize>());
        let b = bits(&e, SAT_2024_01_06);
        let mut lo = 0;
        for (size, w) in sizes.iter().zip([7, 11, 5, 21]) {
            let n = b
                .iter()
                .filter(|&&x| x >= lo && x < lo + *size as u32)
                .count();
            assert_eq!(n, w);
            lo += *size as u32;
        }
        // Offsetting into a shared buffer shifts every bit.
        let mut buf = vec![999];
        e.encode_into(SAT_2024_01_06, 1000, &mut buf).unwrap();
        assert_eq!(buf[0], 999);
        assert!(buf[1..].iter().zip(&b).all(|(&x, &y)| x == y + 1000));
    }

    #[test]
    fn unrepresentable_timestamp_and_bad_params_are_errors() {
        let e = DateEncoder::new(&DateParams::default()).unwrap();
        let mut out = Sdr::default();
        assert_eq!(
            e.encode(i64::MAX, &mut out),
            Err(EncoderError::Timestamp(i64::MAX))
        );
        let err = DateEncoder::new(&DateParams {
            time_of_day: Some(PeriodicFieldParams {
                width: 20,
                radius: 4.0,
            }),
            ..DateParams::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("`time_of_day.width`"), "{err}");
        let err = DateParams {
            season: Some(PeriodicFieldParams {
                width: 21,
                radius: 0.0,
            }),
            ..DateParams::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("`season.radius`"), "{err}");
        // Everything disabled is allowed and encodes nothing.
        let none = DateEncoder::new(&DateParams {
            time_of_day: None,
            ..DateParams::default()
        })
        .unwrap();
        none.encode(0, &mut out).unwrap();
        assert_eq!((out.size(), out.len()), (0, 0));
    }
}
