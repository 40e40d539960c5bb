//! The Numenta Anomaly Benchmark scorer: NAB's published scoring rules, reimplemented.
//!
//! Every non-probation row of every file gets a weight (what a detection there would be
//! worth), then one threshold per profile is chosen over the whole corpus by sweeping all
//! distinct anomaly scores from the highest down, exactly as NAB's `Sweeper` does, and the
//! best total is normalised against the never-detecting and the perfect detector.
//!
//! Rules (NAB `sweeper.py`, `runner.py`):
//! - probation: the first `min(floor(0.15·N), 750)` rows of an `N`-row file are ignored;
//! - a row inside window `[L, R]` (width `W = R − L + 1`) is worth
//!   `tpWeight · σ(−(R − i + 1)/W) / σ(−1)`, with `σ(x) = 2/(1 + e^{5x}) − 1`
//!   (`σ(x) = −1` for `x > 3`); only a window's best (= earliest) detected row counts, and
//!   a window without detection costs `fnWeight`;
//! - a row outside windows is worth `fpWeight · σ(|R_prev − i| / (W_prev − 1))` after a
//!   window, `−fpWeight` before any window; every detected such row counts;
//! - normalised score `100 · (S − S_null) / (S_perfect − S_null)`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use chrono::NaiveDateTime;
use serde::Deserialize;

/// Weights of one scoring profile (NAB's `CostMatrix`).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
pub struct CostMatrix {
    /// Reward for a window detected at its first row.
    #[serde(rename = "tpWeight")]
    pub tp_weight: f64,
    /// Cost of a detection far from any window.
    #[serde(rename = "fpWeight")]
    pub fp_weight: f64,
    /// Cost of a window without any detection.
    #[serde(rename = "fnWeight")]
    pub fn_weight: f64,
    /// Unused by the score (kept because NAB's files carry it).
    #[serde(rename = "tnWeight", default)]
    pub tn_weight: f64,
}

/// A named scoring profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Name as in `profiles.json` (`standard`, `reward_low_FP_rate`, …).
    pub name: String,
    /// Its weights.
    pub costs: CostMatrix,
}

#[derive(Deserialize)]
struct ProfileEntry {
    #[serde(rename = "CostMatrix")]
    cost_matrix: CostMatrix,
}

/// Parses NAB's `profiles.json`. Order: `standard` first, then the others by name.
pub fn parse_profiles(json: &str) -> Result<Vec<Profile>> {
    let map: BTreeMap<String, ProfileEntry> =
        serde_json::from_str(json).context("profiles: expected {name: {\"CostMatrix\": {...}}}")?;
    let mut profiles: Vec<Profile> = map
        .into_iter()
        .map(|(name, entry)| Profile {
            name,
            costs: entry.cost_matrix,
        })
        .collect();
    profiles.sort_by_key(|p| (p.name != "standard", p.name.clone()));
    Ok(profiles)
}

/// Reads and parses a profiles file.
pub fn load_profiles(path: &Path) -> Result<Vec<Profile>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read profiles file {}", path.display()))?;
    parse_profiles(&text).with_context(|| format!("in {}", path.display()))
}

/// NAB's probation length for an `n`-row file: `min(floor(0.15·n), 750)`.
pub fn probation_length(n: usize) -> usize {
    // Integer form of floor(0.15·n); identical to NAB's float expression for every n
    // up to at least 2·10⁶ (checked), and free of rounding doubts.
    (n.saturating_mul(15) / 100).min(750)
}

/// NAB's scaled sigmoid `σ(x) = 2/(1 + e^{5x}) − 1`, and `−1` for `x > 3`.
pub fn scaled_sigmoid(x: f64) -> f64 {
    if x > 3.0 {
        -1.0
    } else {
        // Same operation order as NAB (2·sigmoid(−5x) − 1) so the weights match its bits.
        2.0 * (1.0 / (1.0 + (5.0 * x).exp())) - 1.0
    }
}

/// An anomaly window as inclusive row indices of its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First row.
    pub start: usize,
    /// Last row (inclusive).
    pub end: usize,
}

/// What a detection at each row of a file would be worth, and the window it falls in.
///
/// Returns one `(weight, window index)` per row (`None` outside windows); this is
/// NAB's `calcSweepScore`. `windows` must be sorted and disjoint.
pub fn row_weights(
    n_rows: usize,
    windows: &[Window],
    costs: &CostMatrix,
) -> Vec<(f64, Option<usize>)> {
    let max_tp = scaled_sigmoid(-1.0);
    let mut out = Vec::with_capacity(n_rows);
    let mut next = 0usize;
    let mut current: Option<usize> = None;
    // (right edge, width) of the last window passed.
    let mut previous: Option<(usize, f64)> = None;
    for i in 0..n_rows {
        if current.is_none() && next < windows.len() && windows[next].start == i {
            current = Some(next);
            next += 1;
        }
        let weight = match current {
            Some(w) => {
                let Window { start, end } = windows[w];
                let width = (end - start + 1) as f64;
                let position = -((end - i + 1) as f64) / width;
                // Normalised first so a window-start detection is worth exactly tpWeight
                // (NAB multiplies first: at most one ulp apart).
                costs.tp_weight * (scaled_sigmoid(position) / max_tp)
            }
            None => match previous {
                // A width-1 window divides by zero here, as in NAB; the distance is then
                // infinite and σ gives −1.
                Some((right, width)) => {
                    scaled_sigmoid((i - right) as f64 / (width - 1.0)) * costs.fp_weight
                }
                None => -costs.fp_weight,
            },
        };
        out.push((weight, current));
        if let Some(w) = current {
            if windows[w].end == i {
                previous = Some((i, (windows[w].end - windows[w].start + 1) as f64));
                current = None;
            }
        }
    }
    out
}

/// One file's detector output together with its labels.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredFile {
    /// Relative path, e.g. `realTweets/Twitter_volume_AAPL.csv` (for messages).
    pub name: String,
    /// The detector's anomaly score for every row.
    pub scores: Vec<f64>,
    /// Anomaly windows, sorted and disjoint.
    pub windows: Vec<Window>,
}

/// Row counts at a threshold (NAB's tp/fp/fn/tn: rows, not windows, probation excluded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Detected rows inside windows.
    pub tp: usize,
    /// Detected rows outside windows.
    pub fp: usize,
    /// Undetected rows inside windows.
    pub fn_: usize,
    /// Undetected rows outside windows.
    pub tn: usize,
}

/// The best threshold of one profile over a corpus.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepResult {
    /// Chosen threshold: rows with `score >= threshold` are detections. When detecting
    /// nothing is best this is NAB's 1.1 (above every score), or `+∞` if some score is
    /// not below 1.1.
    pub threshold: f64,
    /// Raw total `S` at that threshold.
    pub score: f64,
    /// `S_null`: the total of a detector that never fires (`−fnWeight` per window that
    /// has scorable rows; NAB gets it by running its null detector).
    pub null_score: f64,
    /// `S_perfect = tpWeight · windows`.
    pub perfect_score: f64,
    /// `100 · (S − S_null) / (S_perfect − S_null)`; 0 when there is no window.
    pub normalized: f64,
    /// Windows with at least one detection at the threshold.
    pub windows_detected: usize,
    /// All windows of the corpus.
    pub windows_total: usize,
    /// Row counts at the threshold.
    pub counts: Counts,
}

impl fmt::Display for SweepResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "threshold={} score={:.2}",
            self.threshold, self.normalized
        )
    }
}

/// Neumaier-compensated running sum, so the sweep's incremental totals do not drift over
/// hundreds of thousands of additions.
#[derive(Clone, Copy, Default)]
struct Sum {
    sum: f64,
    compensation: f64,
}

impl Sum {
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.compensation += (self.sum - t) + x;
        } else {
            self.compensation += (x - t) + self.sum;
        }
        self.sum = t;
    }

    fn value(&self) -> f64 {
        self.sum + self.compensation
    }
}

/// One scorable (non-probation) row.
struct Point {
    score: f64,
    weight: f64,
    /// Corpus-wide window index, `None` outside windows.
    window: Option<usize>,
}

/// Checks that windows are sorted, disjoint and inside the file.
fn check_windows(file: &ScoredFile) -> Result<()> {
    let n = file.scores.len();
    for (k, w) in file.windows.iter().enumerate() {
        if w.start > w.end || w.end >= n {
            bail!(
                "{}: window {k} [{}, {}] is not within rows 0..{n}",
                file.name,
                w.start,
                w.end
            );
        }
        if k > 0 && file.windows[k - 1].end >= w.start {
            bail!(
                "{}: windows {} and {k} overlap or are out of order",
                file.name,
                k - 1
            );
        }
    }
    if let Some(i) = file.scores.iter().position(|s| s.is_nan()) {
        bail!("{}: anomaly score of row {i} is NaN", file.name);
    }
    Ok(())
}

/// Finds the best single threshold of `costs` over all `files` jointly (NAB's
/// `optimizeThreshold`): every distinct anomaly score is a candidate, plus "detect
/// nothing"; the highest total wins, ties going to the higher threshold as in NAB.
/// O(rows · log rows).
pub fn sweep(files: &[ScoredFile], costs: &CostMatrix) -> Result<SweepResult> {
    let mut points = Vec::new();
    let mut windows_total = 0usize;
    for file in files {
        check_windows(file)?;
        let probation = probation_length(file.scores.len());
        let weights = row_weights(file.scores.len(), &file.windows, costs);
        for (i, (&score, &(weight, window))) in file.scores.iter().zip(&weights).enumerate() {
            if i >= probation {
                points.push(Point {
                    score,
                    weight,
                    window: window.map(|w| windows_total + w),
                });
            }
        }
        windows_total += file.windows.len();
    }

    // best[w]: value of window w at the current threshold; only windows with a scorable
    // row take part (a window entirely in probation is neither won nor lost, as in NAB).
    let mut best: Vec<Option<f64>> = vec![None; windows_total];
    for p in &points {
        if let Some(w) = p.window {
            best[w] = Some(-costs.fn_weight);
        }
    }
    let counted_windows = best.iter().filter(|b| b.is_some()).count();
    let null_score = -costs.fn_weight * counted_windows as f64;
    let perfect_score = costs.tp_weight * windows_total as f64;

    // Highest score first; the stable sort keeps file order among equal scores.
    points.sort_by(|a, b| b.score.total_cmp(&a.score));

    let in_windows = points.iter().filter(|p| p.window.is_some()).count();
    let mut counts = Counts {
        tp: 0,
        fp: 0,
        fn_: in_windows,
        tn: points.len() - in_windows,
    };
    let mut total = Sum::default();
    total.add(null_score);
    let mut detected = 0usize;
    let mut hit = vec![false; windows_total];

    let no_detection = if points.first().is_some_and(|p| p.score >= 1.1) {
        f64::INFINITY
    } else {
        1.1
    };
    let mut chosen = (no_detection, total.value(), 0usize, counts);

    let mut k = 0;
    while k < points.len() {
        let threshold = points[k].score;
        while k < points.len() && points[k].score == threshold {
            let p = &points[k];
            match p.window {
                None => {
                    total.add(p.weight);
                    counts.fp += 1;
                    counts.tn -= 1;
                }
                Some(w) => {
                    if !hit[w] {
                        hit[w] = true;
                        detected += 1;
                    }
                    // The best (= earliest) detected row of the window is its value.
                    let current = best[w].expect("window has a scorable row");
                    if p.weight > current {
                        total.add(p.weight - current);
                        best[w] = Some(p.weight);
                    }
                    counts.tp += 1;
                    counts.fn_ -= 1;
                }
            }
            k += 1;
        }
        let value = total.value();
        if value > chosen.1 {
            chosen = (threshold, value, detected, counts);
        }
    }

    let (threshold, score, windows_detected, counts) = chosen;
    let normalized = if perfect_score == null_score {
        0.0
    } else {
        100.0 * (score - null_score) / (perfect_score - null_score)
    };
    Ok(SweepResult {
        threshold,
        score,
        null_score,
        perfect_score,
        normalized,
        windows_detected,
        windows_total,
        counts,
    })
}

/// The total score of `files` at a fixed `threshold` (detection = `score >= threshold`),
/// computed directly from the rules; the sweep's reference.
pub fn score_at_threshold(files: &[ScoredFile], costs: &CostMatrix, threshold: f64) -> Result<f64> {
    let mut total = Sum::default();
    for file in files {
        check_windows(file)?;
        let probation = probation_length(file.scores.len());
        let weights = row_weights(file.scores.len(), &file.windows, costs);
        let mut window_value: Vec<Option<f64>> = vec![None; file.windows.len()];
        for (i, (&score, &(weight, window))) in file.scores.iter().zip(&weights).enumerate() {
            if i < probation {
                continue;
            }
            match window {
                Some(w) => {
                    let v = window_value[w].get_or_insert(-costs.fn_weight);
                    // Weights fall along a window, so the earliest detection is the best.
                    if score >= threshold && weight > *v {
                        *v = weight;
                    }
                }
                None if score >= threshold => total.add(weight),
                None => {}
            }
        }
        for v in window_value.into_iter().flatten() {
            total.add(v);
        }
    }
    Ok(total.value())
}

/// Parses a NAB timestamp (`YYYY-MM-DD HH:MM:SS`, optionally with `.ffffff`).
pub fn parse_timestamp(s: &str) -> Result<NaiveDateTime> {
    let s = s.trim();
    if let Some(t) = parse_timestamp_fast(s.as_bytes()) {
        return Ok(t);
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f"))
        .map_err(|e| anyhow!("bad timestamp {s:?}: {e}"))
}

/// The common exact shape `YYYY-MM-DD HH:MM:SS[.ffffff]` without the general parser
/// (a quarter million timestamps per corpus load); `None` sends anything else to chrono.
fn parse_timestamp_fast(b: &[u8]) -> Option<NaiveDateTime> {
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let mut nanos = 0u32;
    if b.len() > 19 {
        let frac = &b[20..];
        if b[19] != b'.' || frac.is_empty() || frac.len() > 9 {
            return None;
        }
        let digits = num(20..b.len())?;
        nanos = digits * 10u32.pow(9 - frac.len() as u32);
    }
    chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?.and_hms_nano_opt(
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
        nanos,
    )
}

/// One NAB data file with its labels resolved to row indices.
#[derive(Clone, Debug, PartialEq)]
pub struct LabeledFile {
    /// Path relative to the data directory with `/` separators (the labels' key).
    pub name: String,
    /// Timestamps of the rows.
    pub timestamps: Vec<NaiveDateTime>,
    /// Anomaly windows as row indices.
    pub windows: Vec<Window>,
}

/// Every data file of a corpus, sorted by name.
#[derive(Clone, Debug, PartialEq)]
pub struct Corpus {
    /// The files.
    pub files: Vec<LabeledFile>,
}

impl Corpus {
    /// Number of windows over all files.
    pub fn window_count(&self) -> usize {
        self.files.iter().map(|f| f.windows.len()).sum()
    }

    /// Pairs detector scores (one vector per file, in `files` order) with the labels.
    pub fn with_scores(&self, scores: Vec<Vec<f64>>) -> Result<Vec<ScoredFile>> {
        if scores.len() != self.files.len() {
            bail!(
                "{} score vectors for {} files",
                scores.len(),
                self.files.len()
            );
        }
        self.files
            .iter()
            .zip(scores)
            .map(|(f, s)| {
                if s.len() != f.timestamps.len() {
                    bail!(
                        "{}: {} scores for {} rows",
                        f.name,
                        s.len(),
                        f.timestamps.len()
                    );
                }
                Ok(ScoredFile {
                    name: f.name.clone(),
                    scores: s,
                    windows: f.windows.clone(),
                })
            })
            .collect()
    }
}

/// Relative paths (with `/`) of all `.csv` files under `dir`, sorted.
fn csv_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list directory {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else if path.extension().is_some_and(|e| e == "csv") {
                let rel = path.strip_prefix(root).expect("under root");
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Reads the `timestamp` column (and checks the header) of a NAB-style CSV, plus the
/// column named `extra` if given. Errors name the file and the 1-based line.
fn read_csv_columns(path: &Path, extra: Option<&str>) -> Result<(Vec<NaiveDateTime>, Vec<f64>)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header", path.display()))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| {
                anyhow!(
                    "{}: no {name:?} column in header {:?}",
                    path.display(),
                    headers
                )
            })
    };
    let ts_col = column("timestamp")?;
    let extra_col = extra.map(column).transpose()?;
    let mut timestamps = Vec::new();
    let mut values = Vec::new();
    for (k, record) in reader.records().enumerate() {
        let line = k + 2;
        let record =
            record.with_context(|| format!("{}:{line}: bad CSV record", path.display()))?;
        let ts = record
            .get(ts_col)
            .ok_or_else(|| anyhow!("{}:{line}: missing timestamp", path.display()))?;
        timestamps.push(parse_timestamp(ts).with_context(|| format!("{}:{line}", path.display()))?);
        if let Some(c) = extra_col {
            let field = record
                .get(c)
                .ok_or_else(|| anyhow!("{}:{line}: missing column {c}", path.display()))?
                .trim();
            let v: f64 = field
                .parse()
                .with_context(|| format!("{}:{line}: bad number {field:?}", path.display()))?;
            if v.is_nan() {
                bail!("{}:{line}: score is NaN", path.display());
            }
            values.push(v);
        }
    }
    Ok((timestamps, values))
}

/// Loads every data file under `data_dir` and resolves its windows from the
/// `combined_windows.json` at `labels`. A data file without a labels entry, or a window
/// edge that is not a timestamp of its file, is an error (NAB refuses both too).
pub fn load_corpus(data_dir: &Path, labels: &Path) -> Result<Corpus> {
    let text = std::fs::read_to_string(labels)
        .with_context(|| format!("cannot read labels file {}", labels.display()))?;
    let label_map: BTreeMap<String, Vec<[String; 2]>> =
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{file: [[start, end], ...]}}",
                labels.display()
            )
        })?;
    let names = csv_files(data_dir)?;
    if names.is_empty() {
        bail!("no .csv files under {}", data_dir.display());
    }
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let path = data_dir.join(&name);
        let (timestamps, _) = read_csv_columns(&path, None)?;
        let raw_windows = label_map
            .get(&name)
            .ok_or_else(|| anyhow!("{}: data file {name} has no entry", labels.display()))?;
        let mut windows = Vec::with_capacity(raw_windows.len());
        for [start, end] in raw_windows {
            let find = |s: &String| -> Result<usize> {
                let t =
                    parse_timestamp(s).with_context(|| format!("{}: {name}", labels.display()))?;
                timestamps.iter().position(|&x| x == t).ok_or_else(|| {
                    anyhow!(
                        "{}: window edge {s} is not a timestamp of {name}",
                        labels.display()
                    )
                })
            };
            windows.push(Window {
                start: find(start)?,
                end: find(end)?,
            });
        }
        files.push(LabeledFile {
            name,
            timestamps,
            windows,
        });
    }
    Ok(Corpus { files })
}

/// Reads a detector's results for every corpus file from `RESULTS/<category>/<name>.csv`
/// (column `anomaly_score`), checking that rows and timestamps match the data files.
pub fn load_results(results_dir: &Path, corpus: &Corpus) -> Result<Vec<Vec<f64>>> {
    let missing: Vec<&str> = corpus
        .files
        .iter()
        .filter(|f| !results_dir.join(&f.name).is_file())
        .map(|f| f.name.as_str())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} data file(s) have no results file under {}: {}",
            missing.len(),
            results_dir.display(),
            missing.join(", ")
        );
    }
    corpus
        .files
        .iter()
        .map(|file| {
            let path: PathBuf = results_dir.join(&file.name);
            let (timestamps, scores) = read_csv_columns(&path, Some("anomaly_score"))?;
            if timestamps.len() != file.timestamps.len() {
                bail!(
                    "{}: {} rows, but data file {} has {}",
                    path.display(),
                    timestamps.len(),
                    file.name,
                    file.timestamps.len()
                );
            }
            if let Some(k) = timestamps
                .iter()
                .zip(&file.timestamps)
                .position(|(a, b)| a != b)
            {
                bail!(
                    "{}:{}: timestamp {} differs from the data file's {}",
                    path.display(),
                    k + 2,
                    timestamps[k],
                    file.timestamps[k]
                );
            }
            Ok(scores)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STANDARD: CostMatrix = CostMatrix {
        tp_weight: 1.0,
        fp_weight: 0.11,
        fn_weight: 1.0,
        tn_weight: 1.0,
    };

    fn file(scores: Vec<f64>, windows: &[(usize, usize)]) -> ScoredFile {
        ScoredFile {
            name: "test.csv".into(),
            scores,
            windows: windows
                .iter()
                .map(|&(start, end)| Window { start, end })
                .collect(),
        }
    }

    /// 100 rows → probation 15. One window [40, 49] (W = 10).
    fn with_detections(rows: &[usize]) -> ScoredFile {
        let mut scores = vec![0.0; 100];
        for &r in rows {
            scores[r] = 1.0;
        }
        file(scores, &[(40, 49)])
    }

    fn sigma(x: f64) -> f64 {
        2.0 / (1.0 + (5.0 * x).exp()) - 1.0
    }

    #[test]
    fn sigmoid_shape() {
        assert_eq!(scaled_sigmoid(0.0), 0.0);
        assert!((scaled_sigmoid(-1.0) - 0.986_614_298_151_430_3).abs() < 1e-15);
        assert!((scaled_sigmoid(1.0) + 0.986_614_298_151_430_3).abs() < 1e-15);
        assert_eq!(scaled_sigmoid(3.000_001), -1.0);
        assert!(scaled_sigmoid(3.0) > -1.0);
        assert_eq!(probation_length(100), 15);
        assert_eq!(probation_length(4032), 604);
        assert_eq!(probation_length(22696), 750);
        assert_eq!(probation_length(6), 0);
    }

    #[test]
    fn detection_at_window_start_scores_exactly_tp_weight() {
        let r = sweep(&[with_detections(&[40])], &STANDARD).unwrap();
        assert_eq!(r.threshold, 1.0);
        assert_eq!(r.score, 1.0);
        assert_eq!(r.null_score, -1.0);
        assert_eq!(r.perfect_score, 1.0);
        assert_eq!(r.normalized, 100.0);
        assert_eq!((r.windows_detected, r.windows_total), (1, 1));
        assert_eq!(
            r.counts,
            Counts {
                tp: 1,
                fp: 0,
                fn_: 9,
                tn: 75
            }
        );
        let costs = CostMatrix {
            tp_weight: 2.5,
            ..STANDARD
        };
        assert_eq!(sweep(&[with_detections(&[40])], &costs).unwrap().score, 2.5);
    }

    #[test]
    fn detection_at_window_end_scores_sigma_of_one_over_width() {
        let r = sweep(&[with_detections(&[49])], &STANDARD).unwrap();
        let expect = sigma(-1.0 / 10.0) / sigma(-1.0);
        assert!((r.score - expect).abs() < 1e-12, "{} vs {expect}", r.score);
        // Only the earliest detection counts: start + end = start.
        let r = sweep(&[with_detections(&[49, 40, 45])], &STANDARD).unwrap();
        assert_eq!(r.score, 1.0);
        // Middle: p = −(49 − 45 + 1)/10 = −0.5.
        let r = sweep(&[with_detections(&[45, 47])], &STANDARD).unwrap();
        assert!((r.score - sigma(-0.5) / sigma(-1.0)).abs() < 1e-12);
    }

    #[test]
    fn false_positive_before_any_window_costs_fp_weight() {
        // Row 20 (after probation, before the window) plus the window start: the FP adds
        // −0.11, and this threshold still beats detecting nothing (S = −1).
        let r = sweep(&[with_detections(&[20, 40])], &STANDARD).unwrap();
        assert!((r.score - (1.0 - 0.11)).abs() < 1e-15, "{}", r.score);
        assert_eq!(r.counts.fp, 1);
        let only_fp = score_at_threshold(&[with_detections(&[20])], &STANDARD, 0.5).unwrap();
        assert!((only_fp - (-1.0 - 0.11)).abs() < 1e-15);
    }

    #[test]
    fn false_positive_after_window_uses_scaled_distance() {
        // Row 52: d = |49 − 52| / (10 − 1) = 1/3.
        let s = score_at_threshold(&[with_detections(&[40, 52])], &STANDARD, 0.5).unwrap();
        let expect = 1.0 + 0.11 * sigma(3.0 / 9.0);
        assert!((s - expect).abs() < 1e-12, "{s} vs {expect}");
        // Right after the window the FP cost is small (σ(1/9) ≈ −0.27)…
        assert!(sigma(1.0 / 9.0) > -0.3);
        // …and beyond 3 widths it is the full −fpWeight.
        let far = score_at_threshold(&[with_detections(&[40, 80])], &STANDARD, 0.5).unwrap();
        assert!((far - (1.0 - 0.11)).abs() < 1e-15);
        // The sweep picks the same value.
        let r = sweep(&[with_detections(&[40, 52])], &STANDARD).unwrap();
        assert!((r.score - expect).abs() < 1e-12);
    }

    #[test]
    fn detections_in_probation_are_ignored() {
        // Rows 0..15 are probation for 100 rows.
        let r = sweep(&[with_detections(&[3, 14, 40])], &STANDARD).unwrap();
        assert_eq!(r.score, 1.0);
        assert_eq!(r.counts.fp, 0);
        // A window fully inside probation is neither rewarded nor penalised.
        let f = file(vec![0.0; 100], &[(2, 5), (40, 49)]);
        let r = sweep(&[f], &STANDARD).unwrap();
        assert_eq!(r.null_score, -1.0);
        assert_eq!(r.windows_total, 2);
    }

    #[test]
    fn sweep_picks_the_best_candidate_threshold() {
        // Scores: window start 0.6, a far FP at 0.9, a near-end window row at 0.8.
        let mut scores = vec![0.0; 100];
        scores[40] = 0.6;
        scores[48] = 0.8;
        scores[25] = 0.9;
        let f = vec![file(scores, &[(40, 49)])];
        let r = sweep(&f, &STANDARD).unwrap();
        let candidates = [1.1, 0.9, 0.8, 0.6, 0.0];
        let by_threshold: Vec<f64> = candidates
            .iter()
            .map(|&t| score_at_threshold(&f, &STANDARD, t).unwrap())
            .collect();
        let best = by_threshold
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(r.threshold, 0.6, "{by_threshold:?}");
        assert!((r.score - best).abs() < 1e-12);
        assert!((r.score - (1.0 - 0.11)).abs() < 1e-12);
        // 0.8 catches only the late window row: −0.11 + σ(−0.2)/σ(−1).
        let at_08 = -0.11 + sigma(-0.2) / sigma(-1.0);
        assert!((by_threshold[2] - at_08).abs() < 1e-12);
        // Thresholds between candidates act like the next candidate up.
        assert_eq!(
            score_at_threshold(&f, &STANDARD, 0.7).unwrap(),
            by_threshold[2]
        );
    }

    #[test]
    fn sweep_agrees_with_brute_force_on_random_cases() {
        let mut rng = htm::random::Random::new(17);
        for case in 0..60 {
            let files: Vec<ScoredFile> = (0..1 + case % 3)
                .map(|_| {
                    let n = 40 + rng.below(200) as usize;
                    // Coarse scores make ties common.
                    let scores = (0..n).map(|_| f64::from(rng.below(12)) / 11.0).collect();
                    let mut windows = Vec::new();
                    let mut at = rng.below(n as u32 / 2) as usize;
                    while at + 3 < n && windows.len() < 3 {
                        let len = 2 + rng.below(10) as usize;
                        let end = (at + len).min(n - 1);
                        windows.push((at, end));
                        at = end + 2 + rng.below(30) as usize;
                    }
                    file(scores, &windows)
                })
                .collect();
            let r = sweep(&files, &STANDARD).unwrap();
            let mut best = (1.1, score_at_threshold(&files, &STANDARD, 1.1).unwrap());
            let mut thresholds: Vec<f64> = files.iter().flat_map(|f| f.scores.clone()).collect();
            thresholds.sort_by(|a, b| b.total_cmp(a));
            thresholds.dedup();
            for t in thresholds {
                let s = score_at_threshold(&files, &STANDARD, t).unwrap();
                if s > best.1 + 1e-12 {
                    best = (t, s);
                }
            }
            assert!(
                (r.score - best.1).abs() < 1e-9,
                "case {case}: {r:?} vs {best:?}"
            );
            assert_eq!(r.threshold, best.0, "case {case}");
        }
    }

    #[test]
    fn perfect_detector_scores_100_and_silent_one_0() {
        let files = vec![
            file(
                (0..200)
                    .map(|i| if i == 50 || i == 120 { 1.0 } else { 0.0 })
                    .collect(),
                &[(50, 60), (120, 135)],
            ),
            file(
                (0..100).map(|i| if i == 70 { 1.0 } else { 0.2 }).collect(),
                &[(70, 80)],
            ),
        ];
        for costs in [
            STANDARD,
            CostMatrix {
                fp_weight: 0.22,
                ..STANDARD
            },
            CostMatrix {
                fn_weight: 2.0,
                ..STANDARD
            },
        ] {
            let r = sweep(&files, &costs).unwrap();
            assert_eq!(r.normalized, 100.0, "{costs:?}");
            assert_eq!(r.windows_detected, 3);
            let silent: Vec<ScoredFile> = files
                .iter()
                .map(|f| ScoredFile {
                    scores: vec![0.0; f.scores.len()],
                    ..f.clone()
                })
                .collect();
            let r = sweep(&silent, &costs).unwrap();
            assert_eq!(r.normalized, 0.0);
            assert_eq!(r.threshold, 1.1);
            assert_eq!(r.windows_detected, 0);
            assert_eq!(r.to_string(), "threshold=1.1 score=0.00");
        }
    }

    #[test]
    fn threshold_is_shared_between_files() {
        // File A: window start at 0.9 and 18 far false positives at 0.5 (8 before the
        // window, 10 more than 3 widths after it: −0.11 each). Alone, A prefers 0.9.
        // File B: its window start scores 0.5. Alone, B prefers 0.5.
        let mut a = vec![0.0; 100];
        a[40] = 0.9;
        for r in [
            20, 22, 24, 26, 28, 30, 32, 34, 80, 82, 84, 86, 88, 90, 92, 94, 96, 98,
        ] {
            a[r] = 0.5;
        }
        let mut b = vec![0.0; 100];
        b[60] = 0.5;
        let fa = file(a, &[(40, 49)]);
        let fb = file(b, &[(60, 69)]);
        let alone_a = sweep(std::slice::from_ref(&fa), &STANDARD).unwrap();
        let alone_b = sweep(std::slice::from_ref(&fb), &STANDARD).unwrap();
        assert_eq!((alone_a.threshold, alone_a.score), (0.9, 1.0));
        assert_eq!((alone_b.threshold, alone_b.score), (0.5, 1.0));
        // Jointly: at 0.9, S = 1 − 1 = 0; at 0.5, S = (1 − 18·0.11) + 1 = 0.02. One
        // threshold for both files, so 0.5 wins even though it hurts file A.
        let joint = sweep(&[fa, fb], &STANDARD).unwrap();
        assert_eq!(joint.threshold, 0.5);
        assert!((joint.score - 0.02).abs() < 1e-12, "{joint:?}");
        assert_eq!(joint.counts.fp, 18);
        assert_eq!((joint.windows_detected, joint.windows_total), (2, 2));
        // Normalised against S_null = −2, S_perfect = 2.
        assert!((joint.normalized - 100.0 * 2.02 / 4.0).abs() < 1e-9);
    }

    #[test]
    fn profiles_parse_from_nab_json() {
        let json = r#"{
            "standard": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0}},
            "reward_low_FP_rate": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.22, "tnWeight": 1.0}},
            "reward_low_FN_rate": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.11, "tnWeight": 1.0}}
        }"#;
        let p = parse_profiles(json).unwrap();
        let names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["standard", "reward_low_FN_rate", "reward_low_FP_rate"]
        );
        assert_eq!(p[0].costs, STANDARD);
        assert_eq!(p[1].costs.fn_weight, 2.0);
        assert_eq!(p[2].costs.fp_weight, 0.22);
        assert!(parse_profiles("{\"x\": {}}").is_err());
    }

    #[test]
    fn timestamps_parse_with_and_without_fraction() {
        let a = parse_timestamp("2014-04-10 07:15:00").unwrap();
        let b = parse_timestamp("2014-04-10 07:15:00.000000").unwrap();
        assert_eq!(a, b);
        assert!(parse_timestamp("2014-04-10").is_err());
        assert!(parse_timestamp("2014-02-30 00:00:00").is_err());
        assert!(parse_timestamp("2014-04-10 07:15:00.").is_err());
        let c = parse_timestamp("2014-04-10 07:15:00.25").unwrap();
        assert_eq!(c - a, chrono::Duration::milliseconds(250));
        // The general parser agrees with the fast path.
        let slow =
            NaiveDateTime::parse_from_str("2015-02-26 21:42:53.123456", "%Y-%m-%d %H:%M:%S%.f");
        assert_eq!(
            parse_timestamp("2015-02-26 21:42:53.123456").unwrap(),
            slow.unwrap()
        );
        assert_eq!(
            parse_timestamp("2015-02-26T21:42:53").unwrap(),
            parse_timestamp("2015-02-26 21:42:53").unwrap()
        );
    }

    #[test]
    fn bad_windows_are_rejected() {
        assert!(sweep(&[file(vec![0.0; 50], &[(30, 60)])], &STANDARD).is_err());
        assert!(sweep(&[file(vec![0.0; 50], &[(30, 40), (35, 45)])], &STANDARD).is_err());
        assert!(sweep(&[file(vec![f64::NAN; 50], &[])], &STANDARD).is_err());
    }
}
