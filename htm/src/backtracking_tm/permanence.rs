//! Synapse permanences as 12-bit codes.
//!
//! NuPIC's backtracking TM learns in `float32`: a synapse starts at `initial_perm` and moves
//! by `+permanence_inc` / `-permanence_dec` (and `-global_decay`), clipped to
//! `permanence_max`. Starting from one value with a few fixed steps, float32 arithmetic
//! reaches only a few distinct permanences when the steps are equal (NAB's settings: 23,
//! rounding included), so a synapse stores the rank of its value among them and a learning
//! step is a table lookup — bit-identical to float32, in 12 bits instead of 32.
//!
//! Unequal steps make float32 rounding wander (0.1 up and 0.05 down reaches thousands of
//! values). Then a code is a count of `1 / FIXED_SCALE` and steps are integer arithmetic:
//! NuPIC's decimal settings (0.1, 0.21, 0.04, 0.008, 0.001 …) are whole counts, so this is
//! the exact decimal result that float32 only approximates.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::params::BacktrackingTmParams;

/// A permanence's code. Codes order as the permanences they stand for; code 0 is
/// permanence 0 (a step that reaches it removes the synapse).
pub type Code = u16;

/// Marks a synapse to be dropped when its segment is next rewritten (above every code).
pub(super) const DROPPED: Code = (1 << 12) - 1;

/// Counts per 1.0 when codes are fixed point.
pub const FIXED_SCALE: f32 = 4000.0;

/// How permanences map to codes, derived from the parameters (never serialised). The tables
/// are shared by every TM with the same permanence parameters.
#[derive(Clone, Debug)]
pub(crate) struct Codec {
    /// Permanence of each code; `values[0]` is 0.
    values: Arc<[f32]>,
    steps: Steps,
    /// Code of `initial_perm`.
    pub initial: Code,
    /// Lowest connected code: a synapse is connected when its code is at least this.
    pub connected: Code,
    /// Largest permanence, `permanence_max`.
    pub max_value: f32,
}

/// Derived data: equal whenever the parameters it comes from are.
impl PartialEq for Codec {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A placeholder until the parameters are known (a deserialised TM before its rebuild).
impl Default for Codec {
    fn default() -> Self {
        Codec {
            values: Arc::from([0.0f32]),
            steps: Steps::Fixed {
                inc: 0,
                dec: 0,
                decay: 0,
                max: 0,
            },
            initial: 0,
            connected: 0,
            max_value: 0.0,
        }
    }
}

#[derive(Clone, Debug)]
enum Steps {
    /// Float32 closure: next code after each step by code (0 = the synapse goes).
    Table {
        up: Arc<[Code]>,
        down: Arc<[Code]>,
        decay: Arc<[Code]>,
    },
    Fixed {
        inc: Code,
        dec: Code,
        decay: Code,
        max: Code,
    },
}

/// The steps NuPIC's float32 code applies; `None` when the synapse goes.
fn step_up(p: f32, inc: f32, max: f32) -> f32 {
    (p + inc).min(max).clamp(0.0, 1.0)
}

fn step_down(p: f32, dec: f32, max: f32) -> Option<f32> {
    let v = (p - dec).min(max);
    (v > 0.0).then(|| v.clamp(0.0, 1.0))
}

fn step_decay(p: f32, decay: f32) -> Option<f32> {
    (p > decay).then(|| (p - decay).clamp(0.0, 1.0))
}

/// Tables by their defining parameters' bits: a fleet of networks shares a handful.
type TableKey = [u32; 5];
static TABLES: Mutex<Vec<(TableKey, Codec)>> = Mutex::new(Vec::new());
const TABLES_KEPT: usize = 16;

impl Codec {
    /// The codec for `p` (validated parameters).
    pub(crate) fn new(p: &BacktrackingTmParams) -> Self {
        let key = [
            p.initial_perm,
            p.permanence_inc,
            p.permanence_dec,
            p.permanence_max,
            p.global_decay,
        ]
        .map(f32::to_bits);
        let mut cached = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        let shared = match cached.iter().find(|(k, _)| *k == key) {
            Some((_, codec)) => codec.clone(),
            None => {
                let codec = Self::table(p).unwrap_or_else(|| Self::fixed(p));
                if cached.len() >= TABLES_KEPT {
                    cached.remove(0);
                }
                cached.push((key, codec.clone()));
                codec
            }
        };
        drop(cached);
        Codec {
            connected: shared.lowest_code_at_least(p.connected_perm),
            ..shared
        }
    }

    /// The float32 closure, or `None` if it needs more codes than there are.
    fn table(p: &BacktrackingTmParams) -> Option<Self> {
        let (inc, dec, max, decay) = (
            p.permanence_inc,
            p.permanence_dec,
            p.permanence_max,
            p.global_decay,
        );
        let start = p.initial_perm.clamp(0.0, 1.0);
        if start <= 0.0 {
            return None;
        }
        let limit = usize::from(DROPPED) - 1;
        let mut seen: HashSet<u32> = HashSet::from([start.to_bits()]);
        let mut todo = vec![start];
        while let Some(v) = todo.pop() {
            let next = [
                Some(step_up(v, inc, max)),
                step_down(v, dec, max),
                (decay > 0.0).then(|| step_decay(v, decay)).flatten(),
            ];
            for n in next.into_iter().flatten() {
                if seen.insert(n.to_bits()) {
                    if seen.len() > limit {
                        return None;
                    }
                    todo.push(n);
                }
            }
        }
        let mut values: Vec<f32> = seen.into_iter().map(f32::from_bits).collect();
        values.push(0.0);
        values.sort_unstable_by(f32::total_cmp);
        let code_of = |v: Option<f32>| -> Code {
            v.map_or(0, |v| {
                values
                    .binary_search_by(|x| x.total_cmp(&v))
                    .expect("in the closure") as Code
            })
        };
        let map = |f: &dyn Fn(f32) -> Option<f32>| -> Arc<[Code]> {
            values
                .iter()
                .enumerate()
                .map(|(i, &v)| if i == 0 { 0 } else { code_of(f(v)) })
                .collect()
        };
        let up = map(&|v| Some(step_up(v, inc, max)));
        let down = map(&|v| step_down(v, dec, max));
        let decay = map(&|v| step_decay(v, decay));
        let initial = code_of(Some(start));
        Some(Codec {
            values: values.into(),
            steps: Steps::Table { up, down, decay },
            initial,
            connected: 0,
            max_value: max,
        })
    }

    fn fixed(p: &BacktrackingTmParams) -> Self {
        let max = fixed_units(p.permanence_max);
        Codec {
            values: (0..=max).map(|c| f32::from(c) / FIXED_SCALE).collect(),
            steps: Steps::Fixed {
                inc: fixed_units(p.permanence_inc),
                dec: fixed_units(p.permanence_dec),
                decay: fixed_units(p.global_decay),
                max,
            },
            initial: fixed_units(p.initial_perm).min(max),
            connected: 0,
            max_value: p.permanence_max,
        }
    }

    fn lowest_code_at_least(&self, threshold: f32) -> Code {
        self.values.partition_point(|&v| v < threshold) as Code
    }

    /// How many codes there are (codes are below it, but for [`DROPPED`]).
    pub(crate) fn num_codes(&self) -> usize {
        self.values.len()
    }

    /// The permanence `code` stands for.
    #[inline]
    pub(crate) fn value(&self, code: Code) -> f32 {
        self.values[usize::from(code)]
    }

    /// `code` after an increment.
    #[inline]
    pub(crate) fn up(&self, code: Code) -> Code {
        self.learning_steps().step(code, true)
    }

    /// `code` after a decrement; 0 when the synapse goes.
    #[inline]
    pub(crate) fn down(&self, code: Code) -> Code {
        self.learning_steps().step(code, false)
    }

    /// The increment and decrement, resolved once: a loop over many synapses matches on
    /// the codec's kind outside the loop rather than at every step.
    pub(crate) fn learning_steps(&self) -> LearningSteps<'_> {
        match &self.steps {
            Steps::Table { up, down, .. } => LearningSteps::Table { up, down },
            Steps::Fixed { inc, dec, max, .. } => LearningSteps::Fixed {
                inc: *inc,
                dec: *dec,
                max: *max,
            },
        }
    }

    /// `code` after global decay; 0 when the synapse goes.
    pub(crate) fn decay(&self, code: Code) -> Code {
        match &self.steps {
            Steps::Table { decay, .. } => decay[usize::from(code)],
            Steps::Fixed { decay, .. } => code.saturating_sub(*decay),
        }
    }

    /// Whether codes are the float32 closure (else fixed point).
    pub(crate) fn is_exact_float32(&self) -> bool {
        matches!(self.steps, Steps::Table { .. })
    }
}

/// [`Codec::up`] and [`Codec::down`] of one codec, as [`Codec::learning_steps`] gives them.
#[derive(Clone, Copy)]
pub(crate) enum LearningSteps<'a> {
    Table { up: &'a [Code], down: &'a [Code] },
    Fixed { inc: Code, dec: Code, max: Code },
}

impl LearningSteps<'_> {
    /// `code` after an increment (`up`) or a decrement; 0 when the synapse goes. A loop that
    /// matches on the kind first and calls this inside each arm gets the kind's step alone.
    #[inline(always)]
    pub(crate) fn step(self, code: Code, up: bool) -> Code {
        match self {
            LearningSteps::Table { up: inc, down } => {
                let table = if up { inc } else { down };
                table[usize::from(code)]
            }
            LearningSteps::Fixed { inc, dec, max } => {
                if up {
                    (code + inc).min(max)
                } else {
                    code.saturating_sub(dec).min(max)
                }
            }
        }
    }
}

/// `value` in counts of `1 / FIXED_SCALE`, rounded to the nearest.
pub(crate) fn fixed_units(value: f32) -> Code {
    (f64::from(value) * f64::from(FIXED_SCALE)).round() as Code
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Random;

    fn params(inc: f32, dec: f32, initial: f32) -> BacktrackingTmParams {
        BacktrackingTmParams {
            permanence_inc: inc,
            permanence_dec: dec,
            initial_perm: initial,
            ..BacktrackingTmParams::default()
        }
    }

    /// Random walks of NuPIC's float32 steps and of codes stay equal, step for step.
    #[test]
    fn equal_steps_code_float32_exactly() {
        let p = BacktrackingTmParams::default();
        let codec = Codec::new(&p);
        assert!(codec.is_exact_float32());
        assert_eq!(
            codec.values.len(),
            24,
            "NAB's steps reach 23 values, plus 0"
        );
        assert_eq!(codec.value(codec.initial), 0.21);
        let mut rng = Random::new(7);
        for _ in 0..200 {
            let (mut value, mut code) = (p.initial_perm, codec.initial);
            for _ in 0..60 {
                if rng.real() < 0.5 {
                    value = step_up(value, p.permanence_inc, p.permanence_max);
                    code = codec.up(code);
                } else {
                    match step_down(value, p.permanence_dec, p.permanence_max) {
                        Some(v) => value = v,
                        None => {
                            assert_eq!(codec.down(code), 0, "the synapse goes");
                            break;
                        }
                    }
                    code = codec.down(code);
                }
                assert_eq!(codec.value(code).to_bits(), value.to_bits());
                assert_eq!(code >= codec.connected, value >= p.connected_perm);
            }
        }
        // float32 rounding is kept: from 1.0, five decrements of 0.1 fall just short of 0.5.
        let mut top = codec.initial;
        for _ in 0..10 {
            top = codec.up(top);
        }
        assert_eq!(codec.value(top), 1.0);
        let below = (0..5).fold(top, |c, _| codec.down(c));
        assert!(codec.value(below) < 0.5 && below < codec.connected);
    }

    #[test]
    fn codes_order_as_permanences() {
        for p in [BacktrackingTmParams::default(), params(0.1, 0.05, 0.21)] {
            let codec = Codec::new(&p);
            assert!(codec.values.windows(2).all(|w| w[0] < w[1]));
            assert!(codec.values.len() < usize::from(DROPPED));
        }
    }

    /// Unequal steps wander in float32, so codes fall back to exact decimal fixed point.
    #[test]
    fn unequal_steps_use_exact_fixed_point() {
        let p = params(0.1, 0.05, 0.21);
        let codec = Codec::new(&p);
        assert!(!codec.is_exact_float32());
        assert_eq!(codec.initial, 840);
        assert_eq!(codec.connected, 2000);
        let mut c = codec.initial;
        for _ in 0..3 {
            c = codec.up(c);
        }
        assert_eq!(codec.value(c), 0.51);
        for _ in 0..20 {
            c = codec.up(c);
        }
        assert_eq!(codec.value(c), 1.0, "clipped at permanence_max");
        for _ in 0..10 {
            c = codec.down(c);
        }
        assert_eq!(
            c, 2000,
            "exactly 0.5 after ten decrements of 0.05: connected"
        );
        for _ in 0..10 {
            c = codec.down(c);
        }
        assert_eq!(c, 0, "reaching 0 removes the synapse");
    }

    #[test]
    fn fixed_point_rejects_steps_below_its_resolution() {
        let err = params(0.1, 0.0001, 0.21)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("`permanence_dec`"), "{err}");
        assert!(err.contains("resolution 1/4000"), "{err}");
        // The float32 closure has no resolution limit.
        let fine = params(0.3, 0.3, 0.0001);
        assert!(Codec::new(&fine).is_exact_float32());
        fine.validate().unwrap();
    }
}
