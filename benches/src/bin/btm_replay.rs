//! Times the backtracking TM alone on a NAB corpus.
//!
//! `dump` runs encoder + SP over every file once (the SP never sees the TM, so its output is
//! fixed) and stores the active columns; `run` replays them through a fresh TM per file,
//! reporting µs per step and a CRC of every raw anomaly score, so a speed change can be checked
//! for bit-identical behaviour on the whole corpus. Times are thread CPU times (Linux).

use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use benches::nab::{list_files, read_file};
use clap::{Parser, Subcommand};
use htm::backtracking_tm::{BacktrackingTm, BacktrackingTmParams};
use htm::encoders::RecordEncoder;
use htm::network::NetworkParams;
use htm::spatial_pooler::SpatialPooler;
use htm::Sdr;
use rayon::prelude::*;

#[derive(Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Encode + SP every file of the corpus and store the active columns.
    Dump {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Replay stored columns through the backtracking TM.
    Run {
        #[arg(long)]
        cols: PathBuf,
        /// Only files whose path contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Total segment budget (0 = unlimited); default: the parameter's default.
        #[arg(long)]
        max_segments: Option<u32>,
        /// Evict unreinforced segments first at the budget.
        #[arg(long)]
        unreinforced_first: bool,
        /// Inference backtracking depth (`max_inf_backtrack`).
        #[arg(long)]
        max_inf_backtrack: Option<u32>,
        /// Learning backtracking depth (`max_lrn_backtrack`).
        #[arg(long)]
        max_lrn_backtrack: Option<u32>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Print one line per file.
        #[arg(long)]
        verbose: bool,
    },
}

struct Stream {
    name: String,
    steps: Vec<Vec<u32>>,
}

fn write_u32(w: &mut impl Write, v: u32) -> Result<()> {
    w.write_all(&v.to_le_bytes())?;
    Ok(())
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn dump(data: PathBuf, out: PathBuf) -> Result<()> {
    let files = list_files(&data)?;
    let streams = files
        .par_iter()
        .map(|f| -> Result<Stream> {
            let file = read_file(&data, f)?;
            let (min, max) = file
                .values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            let mut params = NetworkParams::nab(min, max, file.values.len());
            let mut encoder = RecordEncoder::new(&params.encoder)?;
            params.sp.input_size = encoder.size() as u32;
            let mut sp = SpatialPooler::new(params.sp.clone())?;
            let mut input = Sdr::new(encoder.size());
            let mut columns = Sdr::new(sp.num_columns());
            let mut steps = Vec::with_capacity(file.values.len());
            for (&t, &v) in file.seconds.iter().zip(&file.values) {
                encoder.encode(t, v, &mut input)?;
                sp.compute(&input, true, &mut columns);
                steps.push(columns.sparse().to_vec());
            }
            Ok(Stream {
                name: f.display().to_string(),
                steps,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut w = BufWriter::new(fs::File::create(&out)?);
    write_u32(&mut w, streams.len() as u32)?;
    for s in &streams {
        write_u32(&mut w, s.name.len() as u32)?;
        w.write_all(s.name.as_bytes())?;
        write_u32(&mut w, s.steps.len() as u32)?;
        for cols in &s.steps {
            write_u32(&mut w, cols.len() as u32)?;
            for &c in cols {
                write_u32(&mut w, c)?;
            }
        }
    }
    w.flush()?;
    println!("dumped {} files to {}", streams.len(), out.display());
    Ok(())
}

fn load(path: &PathBuf) -> Result<Vec<Stream>> {
    let mut r = BufReader::new(
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let n = read_u32(&mut r)?;
    let mut streams = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = read_u32(&mut r)? as usize;
        let mut name = vec![0u8; len];
        r.read_exact(&mut name)?;
        let steps_n = read_u32(&mut r)?;
        let mut steps = Vec::with_capacity(steps_n as usize);
        for _ in 0..steps_n {
            let k = read_u32(&mut r)?;
            let cols = (0..k)
                .map(|_| read_u32(&mut r))
                .collect::<Result<Vec<_>>>()?;
            steps.push(cols);
        }
        streams.push(Stream {
            name: String::from_utf8(name)?,
            steps,
        });
    }
    Ok(streams)
}

struct FileRun {
    seconds: f64,
    steps: usize,
    crc: u32,
    segments: usize,
    synapses: usize,
    heap: usize,
}

/// CPU time of the calling thread, so that figures hold up on a shared machine.
fn thread_cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; the clock id is Linux's thread CPU clock.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime failed");
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn run_one(s: &Stream, params: &BacktrackingTmParams) -> FileRun {
    let mut tm = BacktrackingTm::new(params.clone()).expect("valid params");
    let mut crc = crc32fast_lite::Crc::default();
    let start = thread_cpu_seconds();
    for cols in &s.steps {
        let a = tm.compute(cols, true);
        crc.update(&a.to_bits().to_le_bytes());
    }
    let seconds = thread_cpu_seconds() - start;
    FileRun {
        seconds,
        steps: s.steps.len(),
        crc: crc.finish(),
        segments: tm.num_segments(),
        synapses: tm.num_synapses(),
        heap: tm.heap_bytes(),
    }
}

/// A tiny CRC-32 (IEEE) so this binary needs no extra dependency.
mod crc32fast_lite {
    #[derive(Default)]
    pub struct Crc(u32);

    impl Crc {
        pub fn update(&mut self, bytes: &[u8]) {
            let mut c = !self.0;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = (c >> 1) ^ (0xEDB8_8320 & (c & 1).wrapping_neg());
                }
            }
            self.0 = !c;
        }

        pub fn finish(&self) -> u32 {
            self.0
        }
    }
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Dump { data, out } => dump(data, out),
        Cmd::Run {
            cols,
            filter,
            max_segments,
            unreinforced_first,
            max_inf_backtrack,
            max_lrn_backtrack,
            threads,
            verbose,
        } => {
            let mut streams = load(&cols)?;
            if let Some(f) = &filter {
                streams.retain(|s| s.name.contains(f.as_str()));
            }
            if streams.is_empty() {
                bail!("no stream matches");
            }
            let mut params = BacktrackingTmParams::default();
            if let Some(m) = max_segments {
                params.max_segments = m;
            }
            if let Some(n) = max_inf_backtrack {
                params.max_inf_backtrack = n;
            }
            if let Some(n) = max_lrn_backtrack {
                params.max_lrn_backtrack = n;
            }
            if unreinforced_first {
                params.max_segments_eviction = htm::backtracking_tm::Eviction::UnreinforcedFirst;
            }
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .build()?;
            let wall = Instant::now();
            let runs: Vec<FileRun> =
                pool.install(|| streams.par_iter().map(|s| run_one(s, &params)).collect());
            let wall = wall.elapsed().as_secs_f64();
            let mut all = crc32fast_lite::Crc::default();
            let (mut secs, mut steps, mut max_heap) = (0.0, 0usize, 0usize);
            let mut worst = (0.0f64, String::new());
            for (s, r) in streams.iter().zip(&runs) {
                all.update(&r.crc.to_le_bytes());
                secs += r.seconds;
                steps += r.steps;
                max_heap = max_heap.max(r.heap);
                let us = r.seconds * 1e6 / r.steps as f64;
                if us > worst.0 {
                    worst = (us, s.name.clone());
                }
                if verbose {
                    println!(
                        "{:>9.1} µs/step {:>7} seg {:>8} syn {:>6.1} MB crc {:08x} {}",
                        us,
                        r.segments,
                        r.synapses,
                        r.heap as f64 / 1e6,
                        r.crc,
                        s.name
                    );
                }
            }
            println!(
                "btm: files={} steps={} tm_us_per_step={:.1} worst={:.1} ({}) max_heap_mb={:.1} \
                 wall_s={:.2} crc={:08x}",
                streams.len(),
                steps,
                secs * 1e6 / steps as f64,
                worst.0,
                worst.1,
                max_heap as f64 / 1e6,
                wall,
                all.finish()
            );
            Ok(())
        }
    }
}
