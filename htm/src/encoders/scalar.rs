//! NuPIC's `ScalarEncoder`: a value becomes `w` contiguous active bits whose position moves
//! with the value; with `periodic` the bits wrap around the end of the vector.

use super::{write_sdr, EncoderError};
use crate::sdr::Sdr;
use serde::{Deserialize, Serialize};

/// Parameters of [`ScalarEncoder`], NuPIC names. Exactly one of `n`, `radius`, `resolution`
/// must be non-zero (all are 0 by default, as in NuPIC, so one has to be chosen).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScalarParams {
    /// Active bits per encoding (odd).
    pub w: u32,
    /// Lowest value of the range.
    pub minval: f64,
    /// Highest value (exclusive when periodic).
    pub maxval: f64,
    /// Whether the range wraps around (e.g. hour of day).
    pub periodic: bool,
    /// Total output bits; 0 = derive from `radius` or `resolution`.
    pub n: u32,
    /// Inputs this far apart get non-overlapping encodings; 0 = unused.
    pub radius: f64,
    /// Inputs this far apart get different encodings; 0 = unused.
    pub resolution: f64,
    /// Clip out-of-range inputs of a non-periodic encoder instead of failing.
    pub clip_input: bool,
}

impl Default for ScalarParams {
    fn default() -> Self {
        ScalarParams {
            w: 21,
            minval: 0.0,
            maxval: 100.0,
            periodic: false,
            n: 0,
            radius: 0.0,
            resolution: 0.0,
            clip_input: false,
        }
    }
}

impl ScalarParams {
    /// Checks the parameters (the same checks [`ScalarEncoder::new`] makes).
    pub fn validate(&self) -> Result<(), EncoderError> {
        ScalarEncoder::new(self.clone()).map(|_| ())
    }
}

/// NuPIC's `ScalarEncoder` (without the `w >= 21` "reasonable settings" check, which NuPIC's
/// date encoder also skips).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalarEncoder {
    params: ScalarParams,
    n: u32,
    halfwidth: i64,
    /// Bits outside the range on each side (`halfwidth` unless periodic).
    padding: i64,
    resolution: f64,
    radius: f64,
    /// `maxval − minval`, plus one resolution step when non-periodic (NuPIC's `range`).
    range: f64,
    /// `n − 2·padding`.
    n_internal: i64,
}

impl ScalarEncoder {
    /// Derives `n`, `radius` and `resolution` from whichever one is given, as NuPIC does.
    pub fn new(params: ScalarParams) -> Result<Self, EncoderError> {
        let p = &params;
        if p.w == 0 || p.w.is_multiple_of(2) {
            return Err(EncoderError::param(
                "w",
                p.w,
                "must be an odd positive integer",
            ));
        }
        if !p.minval.is_finite() {
            return Err(EncoderError::param("minval", p.minval, "must be finite"));
        }
        if !(p.maxval.is_finite() && p.maxval > p.minval) {
            return Err(EncoderError::param(
                "maxval",
                p.maxval,
                "must be finite and strictly greater than minval",
            ));
        }
        for (name, v) in [("radius", p.radius), ("resolution", p.resolution)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(EncoderError::param(
                    name,
                    v,
                    "must be a non-negative finite number",
                ));
            }
        }
        let given =
            usize::from(p.n != 0) + usize::from(p.radius != 0.0) + usize::from(p.resolution != 0.0);
        if given != 1 {
            return Err(EncoderError::param(
                "n/radius/resolution",
                format!("{}/{}/{}", p.n, p.radius, p.resolution),
                "exactly one of n, radius and resolution must be non-zero",
            ));
        }

        let w = f64::from(p.w);
        let halfwidth = i64::from((p.w - 1) / 2);
        let padding = if p.periodic { 0 } else { halfwidth };
        let range_internal = p.maxval - p.minval;
        let (n, resolution, radius);
        if p.n != 0 {
            if p.n <= p.w {
                return Err(EncoderError::param("n", p.n, "must be greater than w"));
            }
            n = p.n;
            resolution = if p.periodic {
                range_internal / f64::from(n)
            } else {
                range_internal / f64::from(n - p.w)
            };
            radius = w * resolution;
        } else {
            if p.radius != 0.0 {
                radius = p.radius;
                resolution = radius / w;
            } else {
                resolution = p.resolution;
                radius = resolution * w;
            }
            let range = if p.periodic {
                range_internal
            } else {
                range_internal + resolution
            };
            let nfloat = w * (range / radius) + 2.0 * padding as f64;
            let nceil = nfloat.ceil();
            // A periodic encoder narrower than w would wrap onto its own bits.
            if !(nceil > w && nceil <= f64::from(u32::MAX)) {
                let name = if p.radius != 0.0 {
                    "radius"
                } else {
                    "resolution"
                };
                let v = if p.radius != 0.0 {
                    p.radius
                } else {
                    p.resolution
                };
                return Err(EncoderError::param(
                    name,
                    v,
                    "gives a derived n that is not greater than w (or absurdly large)",
                ));
            }
            n = nceil as u32;
        }
        let range = if p.periodic {
            range_internal
        } else {
            range_internal + resolution
        };
        Ok(ScalarEncoder {
            n,
            halfwidth,
            padding,
            resolution,
            radius,
            range,
            n_internal: i64::from(n) - 2 * padding,
            params,
        })
    }

    /// The parameters it was built with.
    pub fn params(&self) -> &ScalarParams {
        &self.params
    }

    /// Number of output bits (`n`, derived when not given).
    pub fn size(&self) -> usize {
        self.n as usize
    }

    /// Effective resolution (given or derived).
    pub fn resolution(&self) -> f64 {
        self.resolution
    }

    /// Effective radius (given or derived).
    pub fn radius(&self) -> f64 {
        self.radius
    }

    /// Number of distinct encodings (= bucket indices).
    pub fn num_buckets(&self) -> usize {
        if self.params.periodic {
            self.n as usize
        } else {
            (self.n - self.params.w + 1) as usize
        }
    }

    /// First active bit (may be negative or past the end when periodic, before wrapping);
    /// `None` for NaN. NuPIC's `_getFirstOnBit`, except that a periodic encoder wraps an
    /// out-of-range input into its range instead of failing.
    fn first_on_bit(&self, value: f64) -> Result<Option<i64>, EncoderError> {
        if value.is_nan() {
            return Ok(None);
        }
        let p = &self.params;
        let out_of_range = || EncoderError::OutOfRange {
            value,
            minval: p.minval,
            maxval: p.maxval,
        };
        let mut v = value;
        if p.periodic {
            if !v.is_finite() {
                return Err(out_of_range());
            }
            if v < p.minval || v >= p.maxval {
                v = p.minval + (v - p.minval).rem_euclid(p.maxval - p.minval);
                if v >= p.maxval {
                    // rem_euclid can round up to the modulus itself.
                    v = p.minval;
                }
            }
        } else if v < p.minval || v > p.maxval {
            if !p.clip_input {
                return Err(out_of_range());
            }
            v = v.clamp(p.minval, p.maxval);
        }
        let centerbin = if p.periodic {
            ((v - p.minval) * self.n_internal as f64 / self.range) as i64 + self.padding
        } else {
            (((v - p.minval) + self.resolution / 2.0) / self.resolution) as i64 + self.padding
        };
        let minbin = centerbin - self.halfwidth;
        // Guard against float rounding pushing a non-periodic encoding past the edge.
        Ok(Some(if p.periodic {
            minbin
        } else {
            minbin.clamp(0, i64::from(self.n - p.w))
        }))
    }

    /// NuPIC's bucket index: the first active bit, or the centre bit when periodic.
    /// `Ok(None)` for NaN.
    pub fn bucket_index(&self, value: f64) -> Result<Option<usize>, EncoderError> {
        Ok(self.first_on_bit(value)?.map(|minbin| {
            if self.params.periodic {
                (minbin + self.halfwidth).rem_euclid(i64::from(self.n)) as usize
            } else {
                minbin as usize
            }
        }))
    }

    /// Encodes `value` into `out` (resized to `n` bits if needed). NaN gives an empty SDR.
    pub fn encode(&self, value: f64, out: &mut Sdr) -> Result<(), EncoderError> {
        let mut bits = Vec::with_capacity(self.params.w as usize);
        self.encode_into(value, 0, &mut bits)?;
        write_sdr(out, self.size(), &bits);
        Ok(())
    }

    /// Appends the sorted active bits of `value`, shifted by `offset`, to `buf`; on error
    /// nothing is appended.
    pub(crate) fn encode_into(
        &self,
        value: f64,
        offset: u32,
        buf: &mut Vec<u32>,
    ) -> Result<(), EncoderError> {
        let Some(minbin) = self.first_on_bit(value)? else {
            return Ok(());
        };
        let n = i64::from(self.n);
        let start = buf.len();
        buf.extend(
            (minbin..minbin + i64::from(self.params.w)).map(|b| b.rem_euclid(n) as u32 + offset),
        );
        if self.params.periodic {
            buf[start..].sort_unstable();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn periodic(w: u32, minval: f64, maxval: f64, radius: f64) -> ScalarEncoder {
        ScalarEncoder::new(ScalarParams {
            w,
            minval,
            maxval,
            periodic: true,
            radius,
            ..ScalarParams::default()
        })
        .unwrap()
    }

    fn bits(e: &ScalarEncoder, v: f64) -> Vec<u32> {
        let mut out = Sdr::default();
        e.encode(v, &mut out).unwrap();
        assert_eq!(out.size(), e.size());
        out.sparse().to_vec()
    }

    #[test]
    fn periodic_n_matches_nupic_time_of_day() {
        // NAB's time-of-day encoder: 21·24/9.49 = 53.1 → 54 bits.
        let e = periodic(21, 0.0, 24.0, 9.49);
        assert_eq!(e.size(), 54);
        assert!((e.resolution() - 9.49 / 21.0).abs() < 1e-15);
    }

    #[test]
    fn periodic_layout_by_hand_and_wraps() {
        // n = 14 over [1, 8): 2 bits per unit, no padding.
        let e = ScalarEncoder::new(ScalarParams {
            w: 3,
            minval: 1.0,
            maxval: 8.0,
            periodic: true,
            n: 14,
            ..ScalarParams::default()
        })
        .unwrap();
        assert_eq!(bits(&e, 1.0), [0, 1, 13]);
        assert_eq!(bits(&e, 3.0), [3, 4, 5]);
        assert_eq!(bits(&e, 7.99), [0, 12, 13]);
        assert_eq!(e.bucket_index(1.0).unwrap(), Some(0));
        assert_eq!(e.bucket_index(7.99).unwrap(), Some(13));
        // Out-of-range periodic inputs wrap around.
        assert_eq!(bits(&e, 8.0), bits(&e, 1.0));
        assert_eq!(bits(&e, -4.0), bits(&e, 3.0));
        assert_eq!(e.num_buckets(), 14);
    }

    #[test]
    fn periodic_values_near_the_ends_overlap() {
        let e = periodic(21, 0.0, 24.0, 9.49);
        let (lo, hi, mid) = (bits(&e, 0.1), bits(&e, 23.9), bits(&e, 12.0));
        assert_eq!(lo.len(), 21);
        let ov = |a: &[u32], b: &[u32]| crate::sdr::sorted_intersection_len(a, b);
        assert!(ov(&lo, &hi) >= 19, "overlap {}", ov(&lo, &hi));
        assert_eq!(ov(&lo, &mid), 0);
    }

    #[test]
    fn non_periodic_layout_by_hand() {
        // radius 5 with w 5 → resolution 1; range 11; n = 5·11/5 + 2·2 = 15.
        let e = ScalarEncoder::new(ScalarParams {
            w: 5,
            minval: 0.0,
            maxval: 10.0,
            radius: 5.0,
            ..ScalarParams::default()
        })
        .unwrap();
        assert_eq!(e.size(), 15);
        assert_eq!(bits(&e, 0.0), [0, 1, 2, 3, 4]);
        assert_eq!(bits(&e, 0.49), [0, 1, 2, 3, 4]);
        assert_eq!(bits(&e, 0.5), [1, 2, 3, 4, 5]);
        assert_eq!(bits(&e, 5.0), [5, 6, 7, 8, 9]);
        assert_eq!(bits(&e, 10.0), [10, 11, 12, 13, 14]);
        assert_eq!(e.bucket_index(5.0).unwrap(), Some(5));
        assert_eq!(e.num_buckets(), 11);
        let mut out = Sdr::default();
        e.encode(f64::NAN, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(e.bucket_index(f64::NAN).unwrap(), None);
    }

    #[test]
    fn explicit_n_derives_resolution_and_every_encoding_has_w_bits() {
        let e = ScalarEncoder::new(ScalarParams {
            w: 21,
            minval: -50.0,
            maxval: 50.0,
            n: 121,
            ..ScalarParams::default()
        })
        .unwrap();
        assert_eq!(e.size(), 121);
        assert!((e.resolution() - 1.0).abs() < 1e-12);
        assert!((e.radius() - 21.0).abs() < 1e-12);
        for i in 0..=1000 {
            let v = -50.0 + i as f64 * 0.1;
            let b = bits(&e, v);
            assert_eq!(b.len(), 21);
            assert_eq!(b[20] - b[0], 20, "contiguous at {v}");
        }
        assert_eq!(bits(&e, 50.0), (100..121).collect::<Vec<u32>>());
    }

    #[test]
    fn out_of_range_is_an_error_unless_clipped() {
        let p = ScalarParams {
            w: 21,
            minval: 0.0,
            maxval: 10.0,
            resolution: 0.5,
            ..ScalarParams::default()
        };
        let e = ScalarEncoder::new(p.clone()).unwrap();
        let mut out = Sdr::default();
        for v in [-0.1, 10.1, f64::INFINITY] {
            let err = e.encode(v, &mut out).unwrap_err();
            assert!(matches!(err, EncoderError::OutOfRange { .. }));
            assert!(err.to_string().contains("clip_input"));
        }
        assert!(e.bucket_index(11.0).is_err());
        let c = ScalarEncoder::new(ScalarParams {
            clip_input: true,
            ..p
        })
        .unwrap();
        assert_eq!(bits(&c, -3.0), bits(&c, 0.0));
        assert_eq!(bits(&c, 1e9), bits(&c, 10.0));
        // Periodic encoders cannot encode infinity.
        assert!(periodic(21, 0.0, 24.0, 4.0)
            .encode(f64::NEG_INFINITY, &mut out)
            .is_err());
    }

    #[test]
    fn invalid_params_name_the_parameter() {
        let err = |p: ScalarParams| ScalarEncoder::new(p).unwrap_err().to_string();
        let d = ScalarParams {
            resolution: 1.0,
            ..ScalarParams::default()
        };
        assert!(err(ScalarParams { w: 4, ..d.clone() }).contains("`w`"));
        assert!(err(ScalarParams {
            maxval: 0.0,
            ..d.clone()
        })
        .contains("`maxval`"));
        assert!(err(ScalarParams {
            radius: 3.0,
            ..d.clone()
        })
        .contains("n/radius/resolution"));
        assert!(err(ScalarParams::default()).contains("n/radius/resolution"));
        assert!(err(ScalarParams {
            resolution: 0.0,
            n: 15,
            ..d.clone()
        })
        .contains("`n`"));
        // Periodic with a radius wider than the range would be narrower than w.
        assert!(err(ScalarParams {
            periodic: true,
            resolution: 0.0,
            radius: 500.0,
            ..d
        })
        .contains("`radius`"));
    }
}
