//! Running HTM networks over NAB-format files (`timestamp,value`) under NAB's protocol.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use htm::network::{Network, NetworkParams};

/// Which temporal memory a runner uses, as a command-line choice.
#[derive(Clone, Copy, ValueEnum)]
pub enum TmKind {
    /// NuPIC's backtracking TM (preset `nab`).
    Backtracking,
    /// The newer TM (preset `nab-tm`).
    Current,
}

impl TmKind {
    /// The network preset with this TM and NAB's settings.
    pub fn preset(self) -> &'static str {
        match self {
            TmKind::Backtracking => "nab",
            TmKind::Current => "nab-tm",
        }
    }
}

/// One data file of a NAB-style corpus.
#[derive(Clone, Debug)]
pub struct DataFile {
    /// Path relative to the corpus root, `<category>/<name>.csv`.
    pub relative: PathBuf,
    pub timestamps: Vec<String>,
    pub seconds: Vec<i64>,
    pub values: Vec<f64>,
}

/// NAB timestamps are naive wall-clock times, `YYYY-MM-DD HH:MM:SS` (fractions allowed).
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let t = text.trim();
    chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f"))
        .ok()
        .map(|dt| dt.and_utc().timestamp())
}

/// Lists `root/<category>/*.csv`, sorted, as paths relative to `root`.
pub fn list_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let categories = fs::read_dir(root)
        .with_context(|| format!("cannot read data directory {}", root.display()))?;
    for category in categories {
        let category = category?.path();
        if !category.is_dir() {
            continue;
        }
        for entry in fs::read_dir(&category)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "csv") {
                files.push(path.strip_prefix(root)?.to_path_buf());
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no <category>/<name>.csv files under {}", root.display());
    }
    Ok(files)
}

/// Reads one `timestamp,value` file; a bad row is an error naming file and line.
pub fn read_file(root: &Path, relative: &Path) -> Result<DataFile> {
    let path = root.join(relative);
    let mut reader =
        csv::Reader::from_path(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut file = DataFile {
        relative: relative.to_path_buf(),
        timestamps: Vec::new(),
        seconds: Vec::new(),
        values: Vec::new(),
    };
    for (i, row) in reader.records().enumerate() {
        let line = i + 2; // 1-based, after the header
        let row = row.with_context(|| format!("{}:{line}: unreadable row", path.display()))?;
        let (Some(ts), Some(v)) = (row.get(0), row.get(1)) else {
            bail!("{}:{line}: expected `timestamp,value`", path.display());
        };
        let seconds = parse_timestamp(ts)
            .with_context(|| format!("{}:{line}: bad timestamp {ts:?}", path.display()))?;
        let value: f64 = v
            .trim()
            .parse()
            .ok()
            .filter(|x: &f64| x.is_finite())
            .with_context(|| format!("{}:{line}: bad value {v:?}", path.display()))?;
        file.timestamps.push(ts.to_string());
        file.seconds.push(seconds);
        file.values.push(value);
    }
    Ok(file)
}

/// Scores of one file, one entry per row.
#[derive(Clone, Debug, Default)]
pub struct FileScores {
    pub anomaly_score: Vec<f64>,
    pub raw_score: Vec<f64>,
    pub likelihood: Vec<f64>,
}

/// Runs a fresh network over a file the way NAB runs its detectors: the encoder range comes
/// from the whole file's min and max, and the likelihood's probation from its length.
pub fn run_file(file: &DataFile, preset: &str) -> Result<FileScores> {
    run_file_with(file, preset, &|_| {})
}

/// [`run_file`] with `tweak` applied to the preset's parameters (for parameter sweeps).
pub fn run_file_with(
    file: &DataFile,
    preset: &str,
    tweak: &(dyn Fn(&mut NetworkParams) + Sync),
) -> Result<FileScores> {
    let (min, max) = file
        .values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let mut params = NetworkParams::preset(preset, min, max, file.values.len())?;
    // NAB scores anomalies only; the next-value classifier does not influence them.
    params.classifier = None;
    tweak(&mut params);
    let mut net = Network::new(params)?;
    let mut out = FileScores::default();
    for (&t, &v) in file.seconds.iter().zip(&file.values) {
        let inf = net
            .compute(t, v)
            .with_context(|| format!("{}", file.relative.display()))?;
        out.anomaly_score.push(inf.anomaly_score);
        out.raw_score.push(inf.raw_anomaly);
        out.likelihood.push(inf.likelihood);
    }
    Ok(out)
}

/// Writes `out/<category>/<name>.csv` with NAB's result columns.
pub fn write_scores(out_root: &Path, file: &DataFile, scores: &FileScores) -> Result<()> {
    let path = out_root.join(&file.relative);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut w = csv::Writer::from_path(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    w.write_record([
        "timestamp",
        "value",
        "anomaly_score",
        "raw_score",
        "likelihood",
    ])?;
    for i in 0..file.values.len() {
        w.write_record([
            file.timestamps[i].clone(),
            file.values[i].to_string(),
            scores.anomaly_score[i].to_string(),
            scores.raw_score[i].to_string(),
            scores.likelihood[i].to_string(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// The NAB corpus for tests: `$NAB_DIR`, else `shared/nab` beside the repository, else
/// `/work/shared/nab`. `None` (test skipped) unless `NAB_REQUIRED=1`, which makes a
/// missing corpus a failure.
pub fn test_corpus_dir() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("NAB_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/nab"));
    candidates.push(PathBuf::from("/work/shared/nab"));
    let found = candidates
        .into_iter()
        .find(|d| d.join("labels/combined_windows.json").is_file());
    if found.is_none() {
        assert!(
            std::env::var("NAB_REQUIRED").as_deref() != Ok("1"),
            "NAB_REQUIRED=1 but no NAB corpus found (set NAB_DIR)"
        );
        eprintln!("note: NAB corpus not found; skipping (set NAB_DIR or NAB_REQUIRED=1)");
    }
    found
}
