//! End-to-end checks of the `generator` binary.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_generator"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("generator-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn synth(dir: &Path, tag: &str, seed: &str) -> (Vec<u8>, Vec<u8>) {
    let out = dir.join(format!("{tag}.csv"));
    let labels = dir.join(format!("{tag}.json"));
    let status = bin()
        .args([
            "synth",
            "--devices",
            "4",
            "--days",
            "10",
            "--interval",
            "1h",
            "--seed",
            seed,
        ])
        .args(["--start", "2015-06-01", "--out"])
        .arg(&out)
        .arg("--labels")
        .arg(&labels)
        .output()
        .expect("run synth");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    (
        std::fs::read(out).expect("csv"),
        std::fs::read(labels).expect("labels"),
    )
}

#[test]
fn synth_is_byte_identical_for_a_seed_and_inspect_reads_it() {
    let dir = temp_dir("synth");
    let a = synth(&dir, "a", "99");
    let b = synth(&dir, "b", "99");
    assert_eq!(a, b, "same seed, same bytes");
    let c = synth(&dir, "c", "100");
    assert_ne!(a.0, c.0);
    let labels: serde_json::Value = serde_json::from_slice(&a.1).expect("labels JSON");
    assert_eq!(labels.as_object().expect("object").len(), 4);

    let out = bin()
        .args(["inspect", "--partitions", "3"])
        .arg(dir.join("a.csv"))
        .output()
        .expect("run inspect");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert!(text.starts_with("format:   epa\n"), "{text}");
    assert!(text.contains(" 0 bad"), "{text}");
    assert!(text.contains("devices:  4"), "{text}");
    assert!(text.contains("2015-06-01T00:00:00Z"), "{text}");
    assert!(text.contains("part/3"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inspect_reports_bad_rows_and_honours_format() {
    let dir = temp_dir("inspect");
    let path = dir.join("pump.csv");
    std::fs::write(
        &path,
        "timestamp,value\n2014-01-01 00:00:00,1\nnope,2\n2014-01-01 01:00:00,\n",
    )
    .expect("write");
    let out = bin()
        .arg("inspect")
        .arg(&path)
        .output()
        .expect("run inspect");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert!(text.contains("format:   nab"), "{text}");
    assert!(text.contains("rows:     1 good, 2 bad"), "{text}");
    assert!(
        text.contains("line 3: timestamp: bad timestamp `nope`"),
        "{text}"
    );
    assert!(text.contains("line 4: value: missing value"), "{text}");
    assert!(text.contains("pump "), "device id is the file stem: {text}");

    // Forcing EPA on this file makes every row bad rather than failing or dropping rows.
    let out = bin()
        .args(["inspect", "--format", "epa"])
        .arg(&path)
        .output()
        .expect("run inspect");
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert!(text.contains("rows:     0 good, 3 bad"), "{text}");

    let bad = bin()
        .args(["synth", "--interval", "90s", "--out"])
        .arg(dir.join("x.csv"))
        .arg("--labels")
        .arg(dir.join("x.json"))
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("interval"));
    std::fs::remove_dir_all(&dir).ok();
}
