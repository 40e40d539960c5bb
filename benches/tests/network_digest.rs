//! Whole networks, next-value classifier included, over real NAB files: every field of every
//! record's inference, bit for bit, against digests recorded from the code before the memory
//! layout of the spatial pooler, classifier and likelihood was changed. NAB's own result files
//! leave the classifier out, so this is what pins its predictions.

use std::path::Path;

use benches::nab::{read_file, test_corpus_dir};
use htm::network::{Inference, Network, NetworkParams};

/// FNV-1a over 64-bit words.
fn mix(hash: &mut u64, word: u64) {
    for byte in word.to_le_bytes() {
        *hash = (*hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
}

fn mix_inference(hash: &mut u64, i: &Inference) {
    let opt = |x: Option<f64>| x.map_or(u64::MAX, f64::to_bits);
    for word in [
        i.raw_anomaly.to_bits(),
        i.likelihood.to_bits(),
        i.log_likelihood.to_bits(),
        u64::from(i.spatial_anomaly),
        i.anomaly_score.to_bits(),
        opt(i.prediction),
        opt(i.prediction_next),
        opt(i.error),
    ] {
        mix(hash, word);
    }
}

/// Digest of a whole network's inferences over `file`, and the same digest with the network
/// checkpointed and restored at `restore_at` (which must not change it).
fn digest(dir: &Path, file: &str, preset: &str, restore_at: usize) -> u64 {
    let data = read_file(dir, Path::new(file)).unwrap();
    let (min, max) = data
        .values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let params = NetworkParams::preset(preset, min, max, data.values.len()).unwrap();
    assert!(params.classifier.is_some());
    let (mut straight, mut restored) = (0xcbf2_9ce4_8422_2325u64, 0xcbf2_9ce4_8422_2325u64);
    let mut a = Network::new(params.clone()).unwrap();
    let mut b = Network::new(params).unwrap();
    for (i, (&t, &v)) in data.seconds.iter().zip(&data.values).enumerate() {
        if i == restore_at {
            b = Network::from_bytes(&b.to_bytes()).unwrap();
        }
        mix_inference(&mut straight, &a.compute(t, v).unwrap());
        mix_inference(&mut restored, &b.compute(t, v).unwrap());
    }
    assert_eq!(
        straight, restored,
        "{file} {preset}: restore changed the results"
    );
    straight
}

#[test]
fn whole_network_results_match_the_recorded_digests() {
    let Some(dir) = test_corpus_dir().map(|d| d.join("data")) else {
        return;
    };
    let cases = [
        (
            "realKnownCause/nyc_taxi.csv",
            "nab",
            7_001,
            0x9d6f_2542_aa34_b54f_u64,
        ),
        (
            "realKnownCause/nyc_taxi.csv",
            "nab-tm",
            3_333,
            0x5a1a_d0be_2178_b8ff,
        ),
        (
            "realAWSCloudwatch/ec2_cpu_utilization_825cc2.csv",
            "nab",
            2_500,
            0xb279_2c74_eb1f_7838,
        ),
        (
            "realAWSCloudwatch/ec2_cpu_utilization_825cc2.csv",
            "nab-tm",
            1_234,
            0x67d0_928f_41bd_e8ef,
        ),
    ];
    let mut failed = Vec::new();
    for (file, preset, restore_at, want) in cases {
        let got = digest(&dir, file, preset, restore_at);
        if got != want {
            failed.push(format!(
                "{file} {preset}: digest {got:#018x}, recorded {want:#018x}"
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
