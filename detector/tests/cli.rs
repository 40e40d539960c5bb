//! The `detector` binary as operators run it: metrics endpoint, SIGTERM, unreachable broker,
//! configuration errors.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use generator::records::InputRecord;
use generator::LoadOptions;
use rdkafka::mocking::MockCluster;

fn detector() -> Command {
    Command::new(env!("CARGO_BIN_EXE_detector"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn service_exposes_metrics_and_stops_cleanly_on_sigterm() {
    let mock = MockCluster::new(1).unwrap();
    for t in ["telemetry", "telemetry-enriched", "telemetry-dead-letter"] {
        mock.create_topic(t, 2, 1).unwrap();
    }
    let records: Vec<InputRecord> = (0..200)
        .map(|i| InputRecord {
            device_id: format!("d{}", i % 2),
            timestamp: 1_388_534_400 + 3600 * (i / 2),
            value: (i % 24) as f64,
            fields: None,
        })
        .collect();
    let mut opts = LoadOptions::new(mock.bootstrap_servers(), "telemetry");
    opts.create_topic = false;
    opts.progress = false;
    generator::load(&opts, records.into_iter().map(Ok), None).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = detector()
        .args([
            "run",
            "--bootstrap-servers",
            &mock.bootstrap_servers(),
            "--metrics-addr",
            &addr,
        ])
        .arg("--checkpoint-dir")
        .arg(dir.path())
        .args(["-X", "session.timeout.ms=6000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        if let Some(body) = http_get(&addr, "/metrics") {
            if body.contains("detector_records_in_total 200") {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed 200 records in"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for name in [
        "detector_records_out_total",
        "detector_devices_resident",
        "detector_batch_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    let (status, err) = stop(&mut child);
    assert!(status.success(), "exit {status:?}\n{err}");
    assert!(err.contains("final checkpoint and commit"), "{err}");
    let checkpoints = walk(dir.path());
    assert_eq!(checkpoints, 2, "one checkpoint per device");
}

/// SIGTERM, then the exit status and everything the child wrote to stderr.
fn stop(child: &mut std::process::Child) -> (std::process::ExitStatus, String) {
    sigterm(child);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            if p.is_dir() {
                walk(&p)
            } else {
                usize::from(p.extension().is_some_and(|e| e == "ckpt"))
            }
        })
        .sum()
}

#[test]
fn unreachable_broker_is_reported_and_retried_without_crashing() {
    let mut child = detector()
        .args([
            "run",
            "--bootstrap-servers",
            "127.0.0.1:1",
            "--metrics-addr",
            "",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(13));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the service must keep retrying, not exit"
    );
    let (status, err) = stop(&mut child);
    assert!(
        err.contains("unreachable at 127.0.0.1:1") && err.contains("retrying in"),
        "{err}"
    );
    assert!(
        status.success(),
        "a stop while waiting for the broker is clean: {status:?}"
    );
}

#[test]
fn bad_configuration_is_refused_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[topics]\ninput = \"t\"\n\n[htm]\nprobation = \"long\"\n",
    )
    .unwrap();
    let out = detector()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("line 5") && err.contains("probation"),
        "{err}"
    );
}
