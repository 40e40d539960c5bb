//! Synthetic device streams for the Kafka benches.

use generator::records::InputRecord;
use htm::random::Random;

/// Record `i` of an interleaved stream over `devices` devices (device `i % devices`, hourly
/// steps): a daily cycle, a per-device offset and noise, like device telemetry.
pub fn record(i: usize, devices: usize, rng: &mut Random) -> InputRecord {
    let (d, step) = (i % devices, i / devices);
    let phase = (step % 24) as f64 / 24.0 * std::f64::consts::TAU;
    InputRecord {
        device_id: format!("device-{d:05}"),
        timestamp: 1_388_534_400 + 3600 * step as i64,
        value: 50.0 + 25.0 * phase.sin() + 5.0 * rng.real() + (d % 10) as f64,
        fields: None,
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
