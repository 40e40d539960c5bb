//! Runs one fresh HTM network per NAB data file and writes NAB result files.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use benches::nab::{list_files, read_file, run_file_with, write_scores, TmKind};
use clap::Parser;
use htm::backtracking_tm::Eviction;
use htm::network::{NetworkParams, TmParams};
use rayon::prelude::*;

/// Runs HTM over a NAB corpus: `DATA/<category>/<name>.csv` → `OUT/<category>/<name>.csv`.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Corpus data directory (holding category folders).
    #[arg(long)]
    data: PathBuf,
    /// Where result files are written.
    #[arg(long)]
    out: PathBuf,
    /// Worker threads (files run in parallel; results do not depend on it).
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
    /// Which temporal memory to use.
    #[arg(long, value_enum, default_value_t = TmKind::Backtracking)]
    tm: TmKind,
    /// Override the backtracking TM's total segment budget (0 = unlimited).
    #[arg(long)]
    btm_max_segments: Option<u32>,
    /// Override the current TM's total segment budget (0 = unlimited).
    #[arg(long)]
    tm_max_segments: Option<u32>,
    /// Evict unreinforced segments first at the budget (else the least recently active).
    #[arg(long)]
    btm_unreinforced_first: bool,
    /// Override the backtracking TM's inference backtracking depth (`max_inf_backtrack`).
    #[arg(long)]
    btm_max_inf_backtrack: Option<u32>,
    /// Override the backtracking TM's learning backtracking depth (`max_lrn_backtrack`).
    #[arg(long)]
    btm_max_lrn_backtrack: Option<u32>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let preset = args.tm.preset();
    let (btm_max, tm_max) = (args.btm_max_segments, args.tm_max_segments);
    let unreinforced_first = args.btm_unreinforced_first;
    let (inf_backtrack, lrn_backtrack) = (args.btm_max_inf_backtrack, args.btm_max_lrn_backtrack);
    let tweak = move |p: &mut NetworkParams| match &mut p.tm {
        TmParams::Backtracking(tm) => {
            tm.max_segments = btm_max.unwrap_or(tm.max_segments);
            if unreinforced_first {
                tm.max_segments_eviction = Eviction::UnreinforcedFirst;
            }
            tm.max_inf_backtrack = inf_backtrack.unwrap_or(tm.max_inf_backtrack);
            tm.max_lrn_backtrack = lrn_backtrack.unwrap_or(tm.max_lrn_backtrack);
        }
        TmParams::Current(tm) => tm.max_segments = tm_max.unwrap_or(tm.max_segments),
    };
    let files = list_files(&args.data)?;
    // Parse everything before the clock starts: the figure is HTM throughput, not CSV parsing.
    let data = files
        .iter()
        .map(|f| read_file(&args.data, f))
        .collect::<Result<Vec<_>>>()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads.max(1))
        .build()?;
    let start = Instant::now();
    let scores = pool.install(|| {
        data.par_iter()
            .map(|f| run_file_with(f, preset, &tweak))
            .collect::<Result<Vec<_>>>()
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let mut records = 0usize;
    for (file, s) in data.iter().zip(&scores) {
        write_scores(&args.out, file, s)?;
        records += file.values.len();
    }
    println!(
        "nab: files={} records={} seconds={:.3} records_per_s={:.0}",
        data.len(),
        records,
        seconds,
        records as f64 / seconds
    );
    Ok(())
}
