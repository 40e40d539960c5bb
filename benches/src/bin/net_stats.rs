//! Size and per-stage cost of one network over one NAB file: heap bytes and checkpoint bytes
//! of the whole network and of its spatial pooler and temporal memory, and the mean time per
//! record of each stage (single thread).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use benches::counting::{live_bytes, Counting};
use benches::nab::{list_files, read_file, DataFile, TmKind};
use clap::Parser;
use htm::backtracking_tm::BacktrackingTm;
use htm::encoders::RecordEncoder;
use htm::likelihood::AnomalyLikelihood;
use htm::network::{Network, NetworkParams, TmParams};
use htm::spatial_pooler::SpatialPooler;
use htm::temporal_memory::TemporalMemory;
use htm::Sdr;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Network size and stage costs after one NAB file.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Corpus data directory (holding category folders).
    #[arg(long)]
    data: PathBuf,
    /// File relative to the corpus root.
    #[arg(long, default_value = "realKnownCause/nyc_taxi.csv")]
    file: PathBuf,
    /// Which temporal memory to use.
    #[arg(long, value_enum, default_value_t = TmKind::Current)]
    tm: TmKind,
    /// Leave the next-value classifier out (as the NAB runner does).
    #[arg(long)]
    no_classifier: bool,
    /// Overrides the current TM's global segment cap (`max_segments`, 0 = unlimited).
    #[arg(long)]
    tm_max_segments: Option<u32>,
    /// Runs of each stage alone; the fastest is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Only the first N records of the file (a young network).
    #[arg(long)]
    records: Option<usize>,
    /// Instead: one whole network per corpus file, reporting each one's final size.
    #[arg(long)]
    all: bool,
}

fn bincode_len<T: serde::Serialize>(x: &T) -> usize {
    bincode::serde::encode_to_vec(x, bincode::config::standard())
        .expect("in-memory encoding")
        .len()
}

enum Tm {
    Backtracking(Box<BacktrackingTm>),
    Current(Box<TemporalMemory>),
}

fn params_for(args: &Args, file: &DataFile) -> Result<NetworkParams> {
    let (min, max) = file
        .values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let preset = args.tm.preset();
    let mut params = NetworkParams::preset(preset, min, max, file.values.len())?;
    if args.no_classifier {
        params.classifier = None;
    }
    if let (Some(cap), TmParams::Current(tm)) = (args.tm_max_segments, &mut params.tm) {
        tm.max_segments = cap;
    }
    Ok(params)
}

/// Whole networks over every corpus file: final heap and checkpoint bytes of each.
fn all_files(args: &Args) -> Result<()> {
    let (mut max_heap, mut max_ckpt, mut records, mut seconds) = (0, 0, 0, 0.0);
    for rel in list_files(&args.data)? {
        let file = read_file(&args.data, &rel)?;
        let mut net = Network::new(params_for(args, &file)?)?;
        let start = Instant::now();
        for (&t, &v) in file.seconds.iter().zip(&file.values) {
            net.compute(t, v)?;
        }
        seconds += start.elapsed().as_secs_f64();
        records += file.values.len();
        let (segments, synapses) = net.tm_size();
        let (heap, ckpt) = (net.heap_bytes(), net.to_bytes().len());
        println!(
            "{}: records={} heap_bytes={heap} checkpoint_bytes={ckpt} tm_segments={segments} tm_synapses={synapses}",
            rel.display(),
            file.values.len()
        );
        max_heap = max_heap.max(heap);
        max_ckpt = max_ckpt.max(ckpt);
    }
    println!(
        "all: records={records} records_per_s={:.0} max_heap_bytes={max_heap} max_checkpoint_bytes={max_ckpt}",
        records as f64 / seconds
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.all {
        return all_files(&args);
    }
    let mut file = read_file(&args.data, &args.file)?;
    if let Some(n) = args.records {
        file.values.truncate(n);
        file.seconds.truncate(n);
        file.timestamps.truncate(n);
    }
    let params = params_for(&args, &file)?;
    let preset = args.tm.preset();
    let n = file.values.len();

    // Whole network. A first one fills the process-wide memo of initial pooler layouts, which
    // networks share, so the bytes counted for the second are its own.
    drop(Network::new(params.clone())?);
    let live_before = live_bytes();
    let mut net = Network::new(params.clone())?;
    let start = Instant::now();
    for (&t, &v) in file.seconds.iter().zip(&file.values) {
        net.compute(t, v)?;
    }
    let net_time = start.elapsed();
    let allocated = live_bytes().saturating_sub(live_before);
    let checkpoint = net.to_bytes();
    // A checkpoint round trip, what an eviction and a restore cost beside the file I/O.
    let (mut t_save, mut t_restore) = (Duration::MAX, Duration::MAX);
    for _ in 0..args.repeat {
        let start = Instant::now();
        let bytes = net.to_bytes();
        t_save = t_save.min(start.elapsed());
        let start = Instant::now();
        let back = Network::from_bytes(&bytes)?;
        t_restore = t_restore.min(start.elapsed());
        drop(back);
    }

    // The stages one by one, each run `repeat` times from scratch; the fastest run counts
    // (the machine may be shared, and preemption only ever adds time).
    let mut enc = RecordEncoder::new(&params.encoder)?;
    let mut inputs = Vec::with_capacity(n);
    let start = Instant::now();
    for (&t, &v) in file.seconds.iter().zip(&file.values) {
        let mut input = Sdr::new(enc.size());
        enc.encode(t, v, &mut input)?;
        inputs.push(input);
    }
    let t_enc = start.elapsed();
    let mut sp_params = params.sp.clone();
    sp_params.input_size = enc.size() as u32;
    let mut t_sp = Duration::MAX;
    let mut sp = SpatialPooler::new(sp_params.clone())?;
    let mut cols: Vec<Vec<u32>> = Vec::with_capacity(n);
    for _ in 0..args.repeat {
        sp = SpatialPooler::new(sp_params.clone())?;
        cols.clear();
        let mut out = Sdr::new(sp.num_columns());
        let start = Instant::now();
        for input in &inputs {
            sp.compute(input, true, &mut out);
            cols.push(out.sparse().to_vec());
        }
        t_sp = t_sp.min(start.elapsed());
    }
    let new_tm = || -> Result<Tm> {
        Ok(match &params.tm {
            TmParams::Current(p) => {
                let mut p = p.clone();
                p.column_count = sp.num_columns() as u32;
                Tm::Current(Box::new(TemporalMemory::new(p)?))
            }
            TmParams::Backtracking(p) => {
                let mut p = p.clone();
                p.column_count = sp.num_columns() as u32;
                Tm::Backtracking(Box::new(BacktrackingTm::new(p)?))
            }
        })
    };
    let mut t_tm = Duration::MAX;
    let mut tm = new_tm()?;
    let mut scores: Vec<f64> = Vec::with_capacity(n);
    for _ in 0..args.repeat {
        tm = new_tm()?;
        scores.clear();
        let start = Instant::now();
        for c in &cols {
            let score = match &mut tm {
                Tm::Current(tm) => tm.compute(c, true),
                Tm::Backtracking(tm) => tm.compute(c, true),
            };
            scores.push(f64::from(score));
        }
        t_tm = t_tm.min(start.elapsed());
    }
    let mut t_lik = Duration::MAX;
    for _ in 0..args.repeat {
        let mut likelihood = AnomalyLikelihood::new(params.likelihood.clone());
        let start = Instant::now();
        for (&v, &score) in file.values.iter().zip(&scores) {
            std::hint::black_box(likelihood.anomaly_probability(v, score));
        }
        t_lik = t_lik.min(start.elapsed());
    }
    let mut wins = vec![0u32; sp.num_columns()];
    for &c in cols.iter().flatten() {
        wins[c as usize] += 1;
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let (tm_heap, tm_ser, tm_segs, tm_syns) = match &tm {
        Tm::Current(tm) => (
            tm.heap_bytes(),
            bincode_len(tm),
            tm.connections().num_segments(),
            tm.connections().num_synapses(),
        ),
        Tm::Backtracking(tm) => (
            tm.heap_bytes(),
            bincode_len(tm),
            tm.num_segments(),
            tm.num_synapses(),
        ),
    };
    println!("file={} records={n} tm={preset}", args.file.display());
    println!(
        "network: records_per_s={:.0} heap_bytes={} allocated_bytes={allocated} checkpoint_bytes={}",
        n as f64 / net_time.as_secs_f64(),
        net.heap_bytes(),
        checkpoint.len()
    );
    println!(
        "stages_us: encode={:.2} sp={:.2} tm={:.2} likelihood={:.2} (best of {})",
        us(t_enc),
        us(t_sp),
        us(t_tm),
        us(t_lik),
        args.repeat
    );
    println!(
        "checkpoint_us: save={:.0} restore={:.0} (best of {})",
        t_save.as_secs_f64() * 1e6,
        t_restore.as_secs_f64() * 1e6,
        args.repeat
    );
    println!(
        "sp: heap_bytes={} serialized_bytes={} stored_columns={} logged_columns={}",
        sp.heap_bytes(),
        bincode_len(&sp),
        sp.num_materialised(),
        sp.num_logged()
    );
    if std::env::var_os("NET_STATS_PERMS").is_some() {
        let (mut zero, mut one, mut other, mut total) = (0, 0, 0, 0);
        for col in 0..sp.num_columns() as u32 {
            if sp.is_materialised(col) {
                for p in sp.permanences(col) {
                    total += 1;
                    if p == 0.0 {
                        zero += 1;
                    } else if p == 1.0 {
                        one += 1;
                    } else {
                        other += 1;
                    }
                }
            }
        }
        let mut w: Vec<u32> = wins.iter().copied().filter(|&x| x > 0).collect();
        w.sort_unstable();
        let q = |f: f64| w[((w.len() - 1) as f64 * f) as usize];
        println!(
            "wins per active column: n={} min={} p10={} p25={} p50={} p75={} p90={} max={}",
            w.len(),
            q(0.0),
            q(0.1),
            q(0.25),
            q(0.5),
            q(0.75),
            q(0.9),
            q(1.0)
        );
        for lim in [1, 2, 4, 8, 16, 32, 64] {
            println!(
                "  columns with <= {lim} wins: {}",
                w.iter().filter(|&&x| x <= lim).count()
            );
        }
        println!("sp perms: total={total} zero={zero} one={one} other={other}");
    }
    println!(
        "tm: heap_bytes={tm_heap} serialized_bytes={tm_ser} segments={tm_segs} synapses={tm_syns}"
    );
    // Where the whole network's heap goes, then its spatial pooler's part by part.
    let parts = |list: Vec<(&str, usize)>| -> String {
        list.iter()
            .map(|(name, bytes)| format!("{name}={bytes}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let non_tm: usize = net
        .heap_breakdown()
        .iter()
        .filter(|(name, _)| *name != "tm")
        .map(|&(_, b)| b)
        .sum();
    println!(
        "network heap: {} non_tm={non_tm}",
        parts(net.heap_breakdown())
    );
    // Per thread or per process, shared by poolers: not in the pooler's heap_bytes.
    println!(
        "network sp heap: {} thread_scratch={} shared_initial_layout={}",
        parts(net.spatial_pooler().heap_breakdown()),
        SpatialPooler::thread_scratch_bytes(),
        SpatialPooler::shared_layout_bytes()
    );
    if let Some(c) = net.classifier() {
        println!("network classifier heap: {}", parts(c.heap_breakdown()));
    }
    if let Tm::Backtracking(tm) = &tm {
        let mut parts: Vec<String> = tm
            .heap_breakdown()
            .iter()
            .map(|(name, bytes)| format!("{name}={bytes}"))
            .collect();
        // Per thread, shared by the TMs computing on it: not in the TM's heap_bytes.
        parts.push(format!(
            "thread_scratch={}",
            BacktrackingTm::thread_scratch_bytes()
        ));
        println!("tm heap: {}", parts.join(" "));
    }
    Ok(())
}
