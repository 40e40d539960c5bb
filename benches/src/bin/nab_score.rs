//! Scores a detector's NAB results: one line per profile, `<profile> threshold=T score=S`.
//!
//! ```text
//! nab-score --data DIR --labels FILE --results DIR [--profiles FILE]
//! ```
//! Results are read from `RESULTS/<category>/<name>.csv` (columns `timestamp` and
//! `anomaly_score` are used). Raw totals and counts go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use benches::scoring::{load_corpus, load_profiles, load_results, sweep};
use clap::Parser;

/// Score anomaly detector results on the Numenta Anomaly Benchmark.
#[derive(Parser, Debug)]
#[command(name = "nab-score", version)]
struct Args {
    /// NAB data directory (`<category>/<name>.csv`).
    #[arg(long)]
    data: PathBuf,
    /// Anomaly windows (NAB's `labels/combined_windows.json`).
    #[arg(long)]
    labels: PathBuf,
    /// Detector results directory (`<category>/<name>.csv` with an `anomaly_score` column).
    #[arg(long)]
    results: PathBuf,
    /// Scoring profiles; default: `DATA/../config/profiles.json`.
    #[arg(long)]
    profiles: Option<PathBuf>,
}

fn run(args: Args) -> Result<()> {
    let profiles_path = args
        .profiles
        .clone()
        .unwrap_or_else(|| args.data.join("..").join("config").join("profiles.json"));
    let profiles = load_profiles(&profiles_path)?;
    let corpus = load_corpus(&args.data, &args.labels)?;
    let scores = load_results(&args.results, &corpus)?;
    let files = corpus.with_scores(scores)?;
    let rows: usize = files.iter().map(|f| f.scores.len()).sum();
    eprintln!(
        "{} files, {rows} rows, {} windows",
        files.len(),
        corpus.window_count()
    );
    for profile in &profiles {
        let r = sweep(&files, &profile.costs)?;
        println!("{} {r}", profile.name);
        eprintln!(
            "  {}: raw={:.6} null={} perfect={} windows detected {}/{} rows tp={} fp={} fn={} tn={}",
            profile.name,
            r.score,
            r.null_score,
            r.perfect_score,
            r.windows_detected,
            r.windows_total,
            r.counts.tp,
            r.counts.fp,
            r.counts.fn_,
            r.counts.tn
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nab-score: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
