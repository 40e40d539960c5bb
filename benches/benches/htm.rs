//! Per-record cost of each HTM stage and of a whole network, on a NAB-like stream.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use htm::backtracking_tm::{BacktrackingTm, BacktrackingTmParams};
use htm::encoders::{
    nab_value_params, DateParams, EncoderParams, RecordEncoder, ValueEncoderParams,
};
use htm::likelihood::{AnomalyLikelihood, LikelihoodParams};
use htm::network::{Network, NetworkParams};
use htm::spatial_pooler::{SpatialPooler, SpatialPoolerParams};
use htm::temporal_memory::{TemporalMemory, TemporalMemoryParams};
use htm::Sdr;

const START: i64 = 1_388_534_400;

/// Hourly values with a daily cycle and noise: what device telemetry looks like.
fn stream(len: usize) -> Vec<(i64, f64)> {
    let mut rng = htm::random::Random::new(5);
    (0..len)
        .map(|i| {
            let daily = ((i % 24) as f64 / 24.0 * std::f64::consts::TAU).sin();
            (
                START + 3600 * i as i64,
                50.0 + 30.0 * daily + 10.0 * rng.real(),
            )
        })
        .collect()
}

fn encoder() -> RecordEncoder {
    RecordEncoder::new(&EncoderParams {
        value: ValueEncoderParams::Rdse(nab_value_params(0.0, 100.0)),
        date: DateParams::default(),
    })
    .unwrap()
}

/// Encoded inputs and SP columns for a warmed-up stream, to feed later stages.
fn columns(len: usize) -> (Vec<Sdr>, Vec<Vec<u32>>) {
    let mut enc = encoder();
    let mut sp = SpatialPooler::new(SpatialPoolerParams {
        input_size: enc.size() as u32,
        ..Default::default()
    })
    .unwrap();
    let mut inputs = Vec::new();
    let mut cols = Vec::new();
    let mut out = Sdr::new(sp.num_columns());
    for (t, v) in stream(len) {
        let mut input = Sdr::new(enc.size());
        enc.encode(t, v, &mut input).unwrap();
        sp.compute(&input, true, &mut out);
        inputs.push(input);
        cols.push(out.sparse().to_vec());
    }
    (inputs, cols)
}

fn stages(c: &mut Criterion) {
    let data = stream(4000);
    let mut g = c.benchmark_group("per_record");

    let mut enc = encoder();
    let mut sdr = Sdr::new(enc.size());
    let mut i = 0;
    g.bench_function("encode", |b| {
        b.iter(|| {
            let (t, v) = data[i % data.len()];
            i += 1;
            enc.encode(t, v, &mut sdr).unwrap();
            black_box(sdr.len())
        })
    });

    let (inputs, cols) = columns(4000);
    let mut sp = SpatialPooler::new(SpatialPoolerParams {
        input_size: inputs[0].size() as u32,
        ..Default::default()
    })
    .unwrap();
    let mut out = Sdr::new(sp.num_columns());
    let mut i = 0;
    g.bench_function("spatial_pooler", |b| {
        b.iter(|| {
            sp.compute(&inputs[i % inputs.len()], true, &mut out);
            i += 1;
            black_box(out.len())
        })
    });

    // TMs are benchmarked after 3000 warm-up records so segment counts are realistic.
    let mut btm = BacktrackingTm::new(BacktrackingTmParams::default()).unwrap();
    for c in &cols[..3000] {
        btm.compute(c, true);
    }
    let mut i = 3000;
    g.bench_function("backtracking_tm", |b| {
        b.iter(|| {
            let a = btm.compute(&cols[i], true);
            i = if i + 1 == cols.len() { 3000 } else { i + 1 };
            black_box(a)
        })
    });

    let mut tm = TemporalMemory::new(TemporalMemoryParams::default()).unwrap();
    for c in &cols[..3000] {
        tm.compute(c, true);
    }
    let mut i = 3000;
    g.bench_function("current_tm", |b| {
        b.iter(|| {
            let a = tm.compute(&cols[i], true);
            i = if i + 1 == cols.len() { 3000 } else { i + 1 };
            black_box(a)
        })
    });

    let mut lik = AnomalyLikelihood::new(LikelihoodParams::default());
    let mut i = 0u64;
    g.bench_function("likelihood", |b| {
        b.iter(|| {
            i += 1;
            black_box(lik.anomaly_probability((i % 97) as f64, (i % 13) as f64 / 13.0))
        })
    });

    for (name, preset) in [
        ("network_backtracking_100_records", "nab"),
        ("network_current_tm_100_records", "nab-tm"),
    ] {
        let mut warm =
            Network::new(NetworkParams::preset(preset, 0.0, 100.0, 4000).unwrap()).unwrap();
        for &(t, v) in &data[..3000] {
            warm.compute(t, v).unwrap();
        }
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || warm.clone(),
                |net| {
                    for &(t, v) in &data[3000..3100] {
                        black_box(net.compute(t, v).unwrap());
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = stages
}
criterion_main!(benches);
