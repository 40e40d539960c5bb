//! Encoders: turn a record (timestamp, scalar value) into the binary input of the spatial pooler.
//!
//! Follows NuPIC's encoders: [`RandomDistributedScalarEncoder`] (NAB's value encoder),
//! [`ScalarEncoder`] (contiguous bits, optionally periodic) and [`DateEncoder`] (a set of
//! scalar sub-encoders over calendar features). [`RecordEncoder`] lays the value encoding and
//! the date encoding end to end, the way the network feeds them to the spatial pooler.

pub mod date;
pub mod rdse;
pub mod scalar;

pub use date::{DateEncoder, DateParams, PeriodicFieldParams, WeekendParams};
pub use rdse::{RandomDistributedScalarEncoder, RdseParams};
pub use scalar::{ScalarEncoder, ScalarParams};

use crate::sdr::Sdr;
use serde::{Deserialize, Serialize};

/// What went wrong building or using an encoder.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EncoderError {
    /// A parameter is outside its valid domain.
    #[error("invalid encoder parameter `{param}` = {value}: {reason}")]
    InvalidParam {
        /// NuPIC-style (snake_case) parameter name, dotted for nested parameters.
        param: String,
        /// The offending value, rendered.
        value: String,
        /// What the parameter must satisfy.
        reason: &'static str,
    },
    /// A value fell outside a non-periodic scalar encoder's range and clipping is off.
    #[error(
        "input {value} outside the encoder range [{minval}, {maxval}] (set clip_input to clip)"
    )]
    OutOfRange {
        /// The input.
        value: f64,
        /// Encoder's `minval`.
        minval: f64,
        /// Encoder's `maxval`.
        maxval: f64,
    },
    /// A timestamp the calendar arithmetic cannot represent.
    #[error("timestamp {0} s is outside the representable calendar range")]
    Timestamp(i64),
}

impl EncoderError {
    pub(crate) fn param(
        param: impl Into<String>,
        value: impl ToString,
        reason: &'static str,
    ) -> Self {
        EncoderError::InvalidParam {
            param: param.into(),
            value: value.to_string(),
            reason,
        }
    }
}

/// A reusable buffer that is not part of a component's logical state: skipped by serde,
/// always equal under `PartialEq`, so a restored component compares equal to the original.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scratch<T>(pub(crate) T);

impl<T> PartialEq for Scratch<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Replaces `out` by an SDR of `size` bits holding `bits` (sorted, unique), reusing `out`'s
/// allocation when it already has the right size.
pub(crate) fn write_sdr(out: &mut Sdr, size: usize, bits: &[u32]) {
    if out.size() != size {
        *out = Sdr::new(size);
    }
    out.set_sorted(bits);
}

/// Parameters of the encoder for the record's scalar value.
///
/// Externally tagged (`{"rdse": {...}}` / `{"scalar": {...}}`) so that it also round-trips
/// through non-self-describing formats such as bincode, which internally tagged enums cannot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueEncoderParams {
    /// NuPIC `RandomDistributedScalarEncoder` (NAB's choice).
    Rdse(RdseParams),
    /// NuPIC `ScalarEncoder`.
    Scalar(ScalarParams),
}

impl Default for ValueEncoderParams {
    fn default() -> Self {
        ValueEncoderParams::Rdse(RdseParams::default())
    }
}

/// Parameters of the whole record encoder.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EncoderParams {
    /// Encoder for the scalar value.
    pub value: ValueEncoderParams,
    /// Encoder for the timestamp.
    pub date: DateParams,
}

impl EncoderParams {
    /// Checks every parameter, naming the first invalid one.
    pub fn validate(&self) -> Result<(), EncoderError> {
        match &self.value {
            ValueEncoderParams::Rdse(p) => p.validate()?,
            ValueEncoderParams::Scalar(p) => p.validate()?,
        }
        self.date.validate()
    }
}

/// NAB's rule for the value encoder: pad the expected range by 20 % on each side and split it
/// into 130 buckets, with a resolution of at least 0.001.
pub fn nab_value_params(min: f64, max: f64) -> RdseParams {
    let padding = (max - min).abs() * 0.2;
    let resolution = f64::max(0.001, ((max + padding) - (min - padding)) / 130.0);
    RdseParams {
        resolution,
        w: 21,
        n: 400,
        seed: 42,
        offset: None,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum ValueEncoder {
    Rdse(RandomDistributedScalarEncoder),
    Scalar(ScalarEncoder),
}

/// Encodes a record as the value encoding followed by the date encoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordEncoder {
    value: ValueEncoder,
    date: DateEncoder,
    #[serde(skip)]
    bits: Scratch<Vec<u32>>,
}

impl RecordEncoder {
    /// Heap bytes held (capacity-based), for memory reporting.
    pub fn heap_bytes(&self) -> usize {
        let value = match &self.value {
            ValueEncoder::Rdse(e) => e.heap_bytes(),
            ValueEncoder::Scalar(_) => 0,
        };
        value + 4 * self.bits.0.capacity()
    }

    /// Builds the value and date encoders.
    pub fn new(params: &EncoderParams) -> Result<Self, EncoderError> {
        let value = match &params.value {
            ValueEncoderParams::Rdse(p) => {
                ValueEncoder::Rdse(RandomDistributedScalarEncoder::new(p.clone())?)
            }
            ValueEncoderParams::Scalar(p) => ValueEncoder::Scalar(ScalarEncoder::new(p.clone())?),
        };
        Ok(RecordEncoder {
            value,
            date: DateEncoder::new(&params.date)?,
            bits: Scratch::default(),
        })
    }

    /// Width of the value encoding (the date bits start here).
    pub fn value_size(&self) -> usize {
        match &self.value {
            ValueEncoder::Rdse(e) => e.size(),
            ValueEncoder::Scalar(e) => e.size(),
        }
    }

    /// Total number of output bits.
    pub fn size(&self) -> usize {
        self.value_size() + self.date.size()
    }

    /// Encodes one record into `out` (resized to [`size`](Self::size) if needed).
    ///
    /// A NaN value contributes no value bits (NuPIC's missing-data behaviour); the date bits
    /// are still set. Fails only for an out-of-range value of a non-clipping, non-periodic
    /// scalar encoder or an unrepresentable timestamp; `out` is then left unchanged.
    pub fn encode(
        &mut self,
        timestamp: i64,
        value: f64,
        out: &mut Sdr,
    ) -> Result<(), EncoderError> {
        let offset = self.value_size() as u32;
        let bits = &mut self.bits.0;
        bits.clear();
        match &mut self.value {
            ValueEncoder::Rdse(e) => e.encode_into(value, 0, bits),
            ValueEncoder::Scalar(e) => e.encode_into(value, 0, bits)?,
        }
        self.date.encode_into(timestamp, offset, bits)?;
        let size = offset as usize + self.date.size();
        write_sdr(out, size, bits);
        Ok(())
    }

    /// The value encoder's bucket for `value` (what the classifier learns to predict).
    ///
    /// `None` for NaN and, with a scalar encoder, for a value it would refuse to encode.
    pub fn bucket_index(&mut self, value: f64) -> Option<usize> {
        match &mut self.value {
            ValueEncoder::Rdse(e) => e.bucket_index(value),
            ValueEncoder::Scalar(e) => e.bucket_index(value).ok().flatten(),
        }
    }

    /// Upper bound on the number of distinct buckets, for sizing a classifier up front.
    pub fn num_buckets_hint(&self) -> usize {
        match &self.value {
            ValueEncoder::Rdse(e) => e.max_buckets(),
            ValueEncoder::Scalar(e) => e.num_buckets(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bincode_round_trip<T: Serialize + serde::de::DeserializeOwned>(x: &T) -> T {
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(x, cfg).unwrap();
        bincode::serde::decode_from_slice(&bytes, cfg).unwrap().0
    }

    #[test]
    fn nab_rule_pads_range_and_floors_resolution() {
        let p = nab_value_params(0.0, 100.0);
        assert!((p.resolution - 140.0 / 130.0).abs() < 1e-12);
        assert_eq!((p.w, p.n, p.seed, p.offset), (21, 400, 42, None));
        assert_eq!(nab_value_params(5.0, 5.0).resolution, 0.001);
    }

    #[test]
    fn record_is_value_bits_then_date_bits() {
        let params = EncoderParams {
            value: ValueEncoderParams::Rdse(nab_value_params(0.0, 10.0)),
            date: DateParams::default(),
        };
        let mut rec = RecordEncoder::new(&params).unwrap();
        assert_eq!(rec.size(), 400 + 54);
        let mut alone = RandomDistributedScalarEncoder::new(nab_value_params(0.0, 10.0)).unwrap();
        let date = DateEncoder::new(&DateParams::default()).unwrap();
        let (mut v, mut d, mut out) = (Sdr::default(), Sdr::default(), Sdr::default());
        let ts = 1_700_000_000;
        rec.encode(ts, 3.5, &mut out).unwrap();
        alone.encode(3.5, &mut v);
        date.encode(ts, &mut d).unwrap();
        assert_eq!(out, Sdr::concat(&[&v, &d]));
        assert_eq!(out.len(), 21 + 21);
        assert_eq!(rec.bucket_index(3.5), alone.bucket_index(3.5));
        assert_eq!(rec.num_buckets_hint(), 1000);

        // Missing value: only the date bits.
        rec.encode(ts, f64::NAN, &mut out).unwrap();
        assert_eq!(out.len(), 21);
        assert!(out.sparse().iter().all(|&b| b >= 400));
        assert_eq!(rec.bucket_index(f64::NAN), None);
    }

    #[test]
    fn scalar_value_errors_propagate_and_leave_output_alone() {
        let params = EncoderParams {
            value: ValueEncoderParams::Scalar(ScalarParams {
                w: 21,
                minval: 0.0,
                maxval: 100.0,
                resolution: 1.0,
                ..ScalarParams::default()
            }),
            date: DateParams::default(),
        };
        let mut rec = RecordEncoder::new(&params).unwrap();
        let mut out = Sdr::default();
        rec.encode(0, 50.0, &mut out).unwrap();
        let before = out.clone();
        let err = rec.encode(0, 150.0, &mut out).unwrap_err();
        assert!(matches!(err, EncoderError::OutOfRange { .. }), "{err}");
        assert_eq!(out, before);
        assert_eq!(rec.bucket_index(150.0), None);
        assert_eq!(rec.bucket_index(50.0), Some(50));
    }

    #[test]
    fn invalid_params_name_the_parameter() {
        let params = EncoderParams {
            value: ValueEncoderParams::Rdse(RdseParams {
                resolution: 0.0,
                ..RdseParams::default()
            }),
            date: DateParams::default(),
        };
        let msg = RecordEncoder::new(&params).unwrap_err().to_string();
        assert!(msg.contains("resolution"), "{msg}");
        assert!(params.validate().is_err());
        assert!(EncoderParams::default().validate().is_ok());
    }

    #[test]
    fn params_and_state_round_trip_through_bincode() {
        let params = EncoderParams {
            value: ValueEncoderParams::Scalar(ScalarParams {
                w: 21,
                minval: 0.0,
                maxval: 10.0,
                radius: 2.0,
                ..ScalarParams::default()
            }),
            date: DateParams {
                weekend: Some(WeekendParams { width: 21 }),
                ..DateParams::default()
            },
        };
        assert_eq!(bincode_round_trip(&params), params);

        let mut rec = RecordEncoder::new(&EncoderParams::default()).unwrap();
        let mut out = Sdr::default();
        for i in 0..50 {
            rec.encode(i * 3600, (i as f64).sin() * 20.0, &mut out)
                .unwrap();
        }
        let mut restored: RecordEncoder = bincode_round_trip(&rec);
        assert_eq!(restored, rec);
        let mut out2 = Sdr::default();
        for i in 50..200 {
            let v = (i as f64).sin() * 40.0 + i as f64;
            rec.encode(i * 3600, v, &mut out).unwrap();
            restored.encode(i * 3600, v, &mut out2).unwrap();
            assert_eq!(out, out2);
        }
        assert_eq!(restored, rec);
    }
}
