//! The NAB scorer on the real corpus (shared/nab) and the `nab-score` CLI end to end.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use benches::nab::test_corpus_dir;
use benches::scoring::{load_corpus, load_profiles, sweep, Corpus};

fn load(dir: &Path) -> Corpus {
    load_corpus(&dir.join("data"), &dir.join("labels/combined_windows.json")).unwrap()
}

/// Scores 1.0 exactly at each window's first row, 0.0 elsewhere.
fn perfect_scores(corpus: &Corpus) -> Vec<Vec<f64>> {
    corpus
        .files
        .iter()
        .map(|f| {
            let mut s = vec![0.0; f.timestamps.len()];
            for w in &f.windows {
                s[w.start] = 1.0;
            }
            s
        })
        .collect()
}

#[test]
fn real_corpus_null_and_perfect_detectors() {
    let Some(dir) = test_corpus_dir() else { return };
    let corpus = load(&dir);
    let rows: usize = corpus.files.iter().map(|f| f.timestamps.len()).sum();
    assert_eq!(corpus.files.len(), 41);
    assert_eq!(rows, 274_491);
    assert_eq!(corpus.window_count(), 79);
    let profiles = load_profiles(&dir.join("config/profiles.json")).unwrap();
    assert_eq!(profiles.len(), 3);

    let zeros = corpus
        .with_scores(
            corpus
                .files
                .iter()
                .map(|f| vec![0.0; f.timestamps.len()])
                .collect(),
        )
        .unwrap();
    let perfect = corpus.with_scores(perfect_scores(&corpus)).unwrap();
    for p in &profiles {
        let start = std::time::Instant::now();
        let r = sweep(&zeros, &p.costs).unwrap();
        eprintln!("{}: sweep of {rows} rows in {:?}", p.name, start.elapsed());
        assert_eq!(r.normalized, 0.0, "{}: {r:?}", p.name);
        // Every NAB window lies after its file's probation.
        assert_eq!(r.null_score, -p.costs.fn_weight * 79.0);
        assert_eq!(r.threshold, 1.1);

        let r = sweep(&perfect, &p.costs).unwrap();
        assert_eq!(r.normalized, 100.0, "{}: {r:?}", p.name);
        assert_eq!(r.threshold, 1.0);
        assert_eq!((r.windows_detected, r.counts.fp), (79, 0));
    }
}

fn write_results(root: &Path, corpus: &Corpus, scores: &[Vec<f64>]) {
    for (file, s) in corpus.files.iter().zip(scores) {
        let path = root.join(&file.name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut text = String::from("timestamp,value,anomaly_score,raw_score,likelihood\n");
        for (t, v) in file.timestamps.iter().zip(s) {
            writeln!(text, "{},0,{v},0,0", t.format("%Y-%m-%d %H:%M:%S")).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nab-score-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn nab_score(args: &[&Path]) -> (bool, String, String) {
    let names = ["--data", "--labels", "--results", "--profiles"];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nab-score"));
    for (name, value) in names.iter().zip(args) {
        cmd.arg(name).arg(value);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_scores_a_perfect_detector_on_the_real_corpus() {
    let Some(dir) = test_corpus_dir() else { return };
    let corpus = load(&dir);
    let results = temp_dir("perfect");
    write_results(&results, &corpus, &perfect_scores(&corpus));
    let data = dir.join("data");
    let labels = dir.join("labels/combined_windows.json");
    // --profiles defaults to DATA/../config/profiles.json.
    let (ok, stdout, stderr) = nab_score(&[&data, &labels, &results]);
    std::fs::remove_dir_all(&results).unwrap();
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        "standard threshold=1 score=100.00\n\
         reward_low_FN_rate threshold=1 score=100.00\n\
         reward_low_FP_rate threshold=1 score=100.00\n"
    );
}

/// A two-file corpus written to a temp dir: data, labels, profiles.
fn tiny_corpus(root: &Path) {
    let mut a = String::from("timestamp,value\n");
    let mut b = String::from("timestamp,value\n");
    for i in 0..100 {
        writeln!(a, "2020-01-01 {:02}:{:02}:00,{i}", i / 60, i % 60).unwrap();
        writeln!(b, "2020-02-01 {:02}:{:02}:00,{i}", i / 60, i % 60).unwrap();
    }
    std::fs::create_dir_all(root.join("data/catA")).unwrap();
    std::fs::create_dir_all(root.join("data/catB")).unwrap();
    std::fs::create_dir_all(root.join("config")).unwrap();
    std::fs::write(root.join("data/catA/a.csv"), a).unwrap();
    std::fs::write(root.join("data/catB/b.csv"), b.trim_end()).unwrap();
    std::fs::write(
        root.join("labels.json"),
        r#"{"catA/a.csv": [["2020-01-01 00:40:00.000000", "2020-01-01 00:49:00.000000"]],
            "catB/b.csv": []}"#,
    )
    .unwrap();
    std::fs::write(
        root.join("config/profiles.json"),
        r#"{"standard": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0}}}"#,
    )
    .unwrap();
}

fn results_file(rows: std::ops::Range<usize>, day: u32, detect: &[usize]) -> String {
    let mut s = String::from("timestamp,value,anomaly_score,raw_score,likelihood\n");
    for i in rows {
        let score = if detect.contains(&i) { 0.75 } else { 0.25 };
        writeln!(
            s,
            "2020-{day:02}-01 {:02}:{:02}:00,{i},{score},0,0",
            i / 60,
            i % 60
        )
        .unwrap();
    }
    s
}

#[test]
fn cli_on_a_tiny_corpus_and_its_error_messages() {
    let root = temp_dir("tiny");
    tiny_corpus(&root);
    let data = root.join("data");
    let labels = root.join("labels.json");
    let results = root.join("results");
    std::fs::create_dir_all(results.join("catA")).unwrap();
    std::fs::create_dir_all(results.join("catB")).unwrap();

    // Missing results for catB/b.csv.
    std::fs::write(results.join("catA/a.csv"), results_file(0..100, 1, &[40])).unwrap();
    let (ok, _, stderr) = nab_score(&[&data, &labels, &results]);
    assert!(!ok);
    assert!(stderr.contains("catB/b.csv"), "{stderr}");

    // a.csv: detections at row 10 (probation: ignored) and at the window start (+1);
    // b.csv (no window): one detection, −0.11.
    std::fs::write(
        results.join("catA/a.csv"),
        results_file(0..100, 1, &[10, 40]),
    )
    .unwrap();
    std::fs::write(results.join("catB/b.csv"), results_file(0..100, 2, &[50])).unwrap();
    let (ok, stdout, stderr) = nab_score(&[&data, &labels, &results]);
    assert!(ok, "{stderr}");
    // S = 1 − 0.11 = 0.89, S_null = −1, S_perfect = 1 → 100·1.89/2 = 94.5.
    assert_eq!(stdout, "standard threshold=0.75 score=94.50\n");

    // A timestamp that disagrees with the data file: error names the file and line.
    let mut bad = results_file(0..100, 2, &[]);
    bad = bad.replace("2020-02-01 00:07:00", "2020-02-01 00:07:30");
    std::fs::write(results.join("catB/b.csv"), bad).unwrap();
    let (ok, _, stderr) = nab_score(&[&data, &labels, &results]);
    assert!(!ok);
    assert!(stderr.contains("b.csv:9"), "{stderr}");

    // Too few rows.
    std::fs::write(results.join("catB/b.csv"), results_file(0..99, 2, &[])).unwrap();
    let (ok, _, stderr) = nab_score(&[&data, &labels, &results]);
    assert!(!ok);
    assert!(
        stderr.contains("99 rows") && stderr.contains("100"),
        "{stderr}"
    );

    // A window edge that is not a timestamp of its file.
    std::fs::write(results.join("catB/b.csv"), results_file(0..100, 2, &[])).unwrap();
    std::fs::write(
        &labels,
        r#"{"catA/a.csv": [["2020-01-01 00:40:30", "2020-01-01 00:49:00"]], "catB/b.csv": []}"#,
    )
    .unwrap();
    let (ok, _, stderr) = nab_score(&[&data, &labels, &results]);
    assert!(!ok);
    assert!(
        stderr.contains("00:40:30") && stderr.contains("catA/a.csv"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
