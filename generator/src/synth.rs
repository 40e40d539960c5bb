//! Realistic synthetic multi-device telemetry in the EPA hourly format, with labelled anomalies.
//!
//! Each device is one monitor (ozone, carbon monoxide or PM2.5) at a plausible US site. Its series
//! is level × seasonal cycle × weekly cycle × diurnal cycle × slow drift × multi-day "weather"
//! (AR(1) in log space), plus AR(1) measurement noise, with occasional missing hours and outages.
//! After a clean period (20 % of the span, so detectors have ≥ 15 % to learn) each device gets a few
//! anomalies of five kinds, each labelled with a window covering the anomaly and a short tail
//! (NAB style). Output is fully determined by the config: every draw comes from seeded PCG streams.

use std::collections::BTreeMap;
use std::f64::consts::TAU;
use std::fmt::Write as _;
use std::io::Write;

use chrono::{DateTime, Datelike, Months, NaiveDate, Timelike};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};

use crate::records::{rfc3339, EPA_COLUMNS};

/// Fraction of the span kept free of anomalies at the start (≥ NAB's 15 % probation).
pub const CLEAN_FRACTION: f64 = 0.2;

/// Settings of one synthesis run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    /// Number of devices (monitors).
    pub devices: u32,
    /// Length of the series in days.
    pub days: u32,
    /// Sampling interval in seconds (a whole number of minutes, at most a day).
    pub interval_secs: u32,
    /// Seed of every random draw.
    pub seed: u64,
    /// First day (UTC midnight) of the series.
    pub start: NaiveDate,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            devices: 6,
            days: 28,
            interval_secs: 3600,
            seed: 7,
            start: NaiveDate::from_ymd_opt(2014, 1, 1).expect("valid date"),
        }
    }
}

/// Errors of the synthesiser.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// A config value is out of range.
    #[error("invalid {param}: {reason}")]
    Invalid {
        /// Parameter name.
        param: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Writing failed.
    #[error("write failed: {0}")]
    Io(#[from] std::io::Error),
    /// Writing CSV failed.
    #[error("CSV write failed: {0}")]
    Csv(#[from] csv::Error),
    /// Writing the labels failed.
    #[error("labels write failed: {0}")]
    Json(#[from] serde_json::Error),
}

fn invalid(param: &'static str, reason: impl Into<String>) -> SynthError {
    SynthError::Invalid {
        param,
        reason: reason.into(),
    }
}

impl SynthConfig {
    /// Checks ranges, naming the offending parameter.
    pub fn validate(&self) -> Result<(), SynthError> {
        if !(1..=100_000).contains(&self.devices) {
            return Err(invalid(
                "devices",
                format!("{} (must be 1..=100000)", self.devices),
            ));
        }
        if !(1..=36_600).contains(&self.days) {
            return Err(invalid(
                "days",
                format!("{} (must be 1..=36600)", self.days),
            ));
        }
        if self.interval_secs < 60
            || self.interval_secs > 86_400
            || !self.interval_secs.is_multiple_of(60)
        {
            return Err(invalid(
                "interval",
                format!(
                    "{} s (must be whole minutes, 1 min ..= 1 day)",
                    self.interval_secs
                ),
            ));
        }
        if self.steps() < 8 {
            return Err(invalid("days", "span holds fewer than 8 samples"));
        }
        Ok(())
    }

    /// Samples per device if nothing were missing.
    pub fn steps(&self) -> u32 {
        (u64::from(self.days) * 86_400 / u64::from(self.interval_secs.max(1))) as u32
    }

    /// Epoch seconds of the first sample.
    pub fn first_timestamp(&self) -> i64 {
        self.start
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            .timestamp()
    }

    /// Epoch seconds of the last sample slot.
    pub fn last_timestamp(&self) -> i64 {
        self.first_timestamp()
            + i64::from(self.steps().saturating_sub(1)) * i64::from(self.interval_secs)
    }
}

/// Parses an interval like `1h`, `30m`, `90s`, `1d` (bare digits are seconds).
pub fn parse_interval(s: &str) -> Result<u32, SynthError> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u32 = num
        .parse()
        .map_err(|_| invalid("interval", format!("`{s}` (expected e.g. 1h, 30m, 900s)")))?;
    let mult = match unit {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(invalid(
                "interval",
                format!("`{s}`: unknown unit `{unit}` (use s, m, h or d)"),
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| invalid("interval", format!("`{s}` is too large")))
}

/// The kinds of injected anomaly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// One or two samples far above normal.
    Spike,
    /// The level changes (up or down) and stays changed.
    LevelShift,
    /// A stuck sensor repeats one value for hours.
    Flatline,
    /// The daily cycle moves by 8–12 hours for a few days.
    PatternChange,
    /// Noise several times stronger for hours.
    NoiseBurst,
}

impl AnomalyKind {
    /// Every kind.
    pub const ALL: [AnomalyKind; 5] = [
        AnomalyKind::Spike,
        AnomalyKind::LevelShift,
        AnomalyKind::Flatline,
        AnomalyKind::PatternChange,
        AnomalyKind::NoiseBurst,
    ];
}

/// One labelled anomaly window (RFC 3339 UTC, both ends inclusive sample times).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// What was injected.
    pub kind: AnomalyKind,
    /// First affected sample.
    pub start: String,
    /// End of the window (the anomaly plus a short tail).
    pub end: String,
}

/// Labels per device key (every device present, possibly with no windows).
pub type Labels = BTreeMap<String, Vec<Label>>;

/// What a run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSummary {
    /// Data rows written.
    pub rows: u64,
    /// Sample slots left empty (gaps).
    pub missing: u64,
    /// Device keys in output order.
    pub devices: Vec<String>,
    /// The anomaly windows.
    pub labels: Labels,
}

/// Writes the labels as pretty JSON.
pub fn write_labels<W: Write>(labels: &Labels, mut out: W) -> Result<(), SynthError> {
    serde_json::to_writer_pretty(&mut out, labels)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Param {
    Ozone,
    Co,
    Pm25,
}

/// Static description of a monitored parameter.
struct ParamInfo {
    code: &'static str,
    name: &'static str,
    units: &'static str,
    mdl: &'static str,
    method_type: &'static str,
    /// (method code, method name) choices.
    methods: &'static [(&'static str, &'static str)],
    decimals: usize,
    /// Physical ceiling the instrument output is clamped to.
    max: f64,
    /// Range of the typical level.
    level: (f64, f64),
    /// Range of the diurnal amplitude (relative).
    diurnal: (f64, f64),
    /// Range of the seasonal amplitude (relative) and the day of year of the seasonal peak.
    season: (f64, f64),
    season_peak_doy: f64,
    /// Weekly factor, Monday first.
    weekly: [f64; 7],
    /// Measurement noise sd relative to the level.
    noise_rel: f64,
    /// Stationary sd of the log "weather" factor.
    weather_sd: f64,
    /// Spike height range (absolute units).
    spike: (f64, f64),
}

const OZONE: ParamInfo = ParamInfo {
    code: "44201",
    name: "Ozone",
    units: "Parts per million",
    mdl: "0.005",
    method_type: "FEM",
    methods: &[
        ("087", "INSTRUMENTAL - ULTRA VIOLET ABSORPTION"),
        ("047", "INSTRUMENTAL - ULTRA VIOLET"),
    ],
    decimals: 3,
    max: 0.145,
    level: (0.027, 0.037),
    diurnal: (0.45, 0.7),
    season: (0.2, 0.35),
    season_peak_doy: 172.0,
    weekly: [1.0, 1.0, 1.0, 1.0, 1.0, 1.04, 1.05],
    noise_rel: 0.06,
    weather_sd: 0.15,
    spike: (0.045, 0.075),
};

const CO: ParamInfo = ParamInfo {
    code: "42101",
    name: "Carbon monoxide",
    units: "Parts per million",
    mdl: "0.02",
    method_type: "FRM",
    methods: &[
        ("093", "INSTRUMENTAL - GAS FILTER CORRELATION CO ANALYZER"),
        ("054", "INSTRUMENTAL - NONDISPERSIVE INFRARED"),
    ],
    decimals: 3,
    max: 20.0,
    level: (0.2, 0.45),
    diurnal: (0.6, 1.0),
    season: (0.2, 0.4),
    season_peak_doy: 15.0,
    weekly: [1.02, 1.02, 1.02, 1.02, 1.04, 0.85, 0.75],
    noise_rel: 0.08,
    weather_sd: 0.2,
    spike: (2.5, 5.0),
};

const PM25: ParamInfo = ParamInfo {
    code: "88101",
    name: "PM2.5 - Local Conditions",
    units: "Micrograms/cubic meter (LC)",
    mdl: "2",
    method_type: "FEM",
    methods: &[(
        "170",
        "Met One BAM-1020 Mass Monitor w/VSCC - Beta Attenuation",
    )],
    decimals: 1,
    max: 500.0,
    level: (6.0, 11.0),
    diurnal: (0.3, 0.5),
    season: (0.1, 0.25),
    season_peak_doy: 15.0,
    weekly: [1.0, 1.0, 1.0, 1.0, 1.02, 0.95, 0.9],
    noise_rel: 0.15,
    weather_sd: 0.3,
    spike: (60.0, 140.0),
};

impl Param {
    fn info(self) -> &'static ParamInfo {
        match self {
            Param::Ozone => &OZONE,
            Param::Co => &CO,
            Param::Pm25 => &PM25,
        }
    }

    /// Diurnal shape in about [-1, 1] at local hour `h`, peak times moved by `shift` hours.
    fn diurnal(self, h: f64, shift: f64) -> f64 {
        match self {
            // Photochemical ozone: low before dawn, peak mid-afternoon.
            Param::Ozone => {
                let x = TAU * (h - 15.0 - shift) / 24.0;
                0.75 * x.cos() + 0.25 * (2.0 * x).cos()
            }
            // Traffic CO: morning and evening rush-hour peaks.
            Param::Co => bump(h, 8.0 + shift, 1.5) + 0.8 * bump(h, 19.0 + shift, 2.2) - 0.35,
            // PM2.5: morning peak and a night-time build-up under the inversion.
            Param::Pm25 => 0.6 * bump(h, 8.0 + shift, 2.0) + 0.9 * bump(h, 22.0 + shift, 3.0) - 0.4,
        }
    }
}

/// Gaussian bump on the 24-hour circle.
fn bump(h: f64, mu: f64, sd: f64) -> f64 {
    let d = (h - mu).rem_euclid(24.0);
    let d = d.min(24.0 - d);
    (-0.5 * (d / sd) * (d / sd)).exp()
}

/// A monitoring site (state/county FIPS codes, coordinates, standard-time UTC offset).
struct Site {
    state_code: &'static str,
    state_name: &'static str,
    county_code: &'static str,
    county_name: &'static str,
    lat: f64,
    lon: f64,
    datum: &'static str,
    utc_offset_h: i64,
    first_site_num: u32,
}

const SITES: [Site; 16] = [
    site(
        "10", "Delaware", "001", "Kent", 38.986672, -75.5568, "WGS84", -5, 2,
    ),
    site(
        "06",
        "California",
        "037",
        "Los Angeles",
        34.06659,
        -118.22688,
        "WGS84",
        -8,
        1103,
    ),
    site(
        "04",
        "Arizona",
        "013",
        "Maricopa",
        33.503833,
        -112.095767,
        "WGS84",
        -7,
        3002,
    ),
    site(
        "17", "Illinois", "031", "Cook", 41.7514, -87.713488, "NAD83", -6, 76,
    ),
    site(
        "36", "New York", "005", "Bronx", 40.8679, -73.87809, "WGS84", -5, 133,
    ),
    site(
        "48", "Texas", "201", "Harris", 29.901036, -95.326137, "NAD83", -6, 1035,
    ),
    site(
        "08",
        "Colorado",
        "031",
        "Denver",
        39.751184,
        -104.987625,
        "WGS84",
        -7,
        2,
    ),
    site(
        "53",
        "Washington",
        "033",
        "King",
        47.568236,
        -122.308628,
        "WGS84",
        -8,
        57,
    ),
    site(
        "13", "Georgia", "089", "DeKalb", 33.688007, -84.290325, "NAD83", -5, 2,
    ),
    site(
        "12",
        "Florida",
        "086",
        "Miami-Dade",
        25.73338,
        -80.16211,
        "WGS84",
        -5,
        27,
    ),
    site(
        "42",
        "Pennsylvania",
        "003",
        "Allegheny",
        40.465420,
        -79.960757,
        "WGS84",
        -5,
        8,
    ),
    site(
        "26", "Michigan", "163", "Wayne", 42.358056, -83.096008, "NAD83", -5, 19,
    ),
    site(
        "49",
        "Utah",
        "035",
        "Salt Lake",
        40.736389,
        -111.872222,
        "WGS84",
        -7,
        3006,
    ),
    site(
        "32",
        "Nevada",
        "003",
        "Clark",
        36.173438,
        -115.332503,
        "WGS84",
        -8,
        75,
    ),
    site(
        "25",
        "Massachusetts",
        "025",
        "Suffolk",
        42.329500,
        -71.082600,
        "WGS84",
        -5,
        42,
    ),
    site(
        "39", "Ohio", "035", "Cuyahoga", 41.492118, -81.678449, "WGS84", -5, 60,
    ),
];

#[allow(clippy::too_many_arguments)]
const fn site(
    state_code: &'static str,
    state_name: &'static str,
    county_code: &'static str,
    county_name: &'static str,
    lat: f64,
    lon: f64,
    datum: &'static str,
    utc_offset_h: i64,
    first_site_num: u32,
) -> Site {
    Site {
        state_code,
        state_name,
        county_code,
        county_name,
        lat,
        lon,
        datum,
        utc_offset_h,
        first_site_num,
    }
}

/// One planned anomaly, in sample steps.
#[derive(Clone, Debug)]
struct Anomaly {
    kind: AnomalyKind,
    /// First affected step.
    start: u32,
    /// One past the last affected step (level shifts last to the end of the data).
    effect_end: u32,
    /// Last step of the label window (inclusive).
    label_end: u32,
    /// Kind-specific size: spike height, shift factor, diurnal shift hours, noise sd.
    size: f64,
}

/// Per-device generator state.
struct Device {
    key: String,
    param: Param,
    site: &'static Site,
    site_num: String,
    lat: String,
    lon: String,
    method: (&'static str, &'static str),
    /// Days between the end of a data month and its `dateOfLastChange`.
    certify_lag_days: u64,
    level: f64,
    diurnal_amp: f64,
    peak_shift: f64,
    season_amp: f64,
    drift_per_year: f64,
    noise_sd: f64,
    noise_phi: f64,
    weather_phi: f64,
    weather_innov_sd: f64,
    anomalies: Vec<Anomaly>,
    outage: Option<(u32, u32)>,
    gap_prob: f64,
    rng: Pcg64,
    noise: f64,
    weather: f64,
    gap_left: u32,
    last_value: f64,
    cached_month: Option<(i32, u32, String)>,
}

/// SplitMix64 finaliser: spreads (seed, index) into independent stream seeds.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Standard normal draw (Box–Muller, one of the pair; simple and deterministic).
fn normal(rng: &mut Pcg64) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

fn uniform(rng: &mut Pcg64, (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Parameter mix: three ozone monitors for each CO and PM2.5 one.
fn param_for(index: u32) -> Param {
    match index % 5 {
        2 => Param::Co,
        4 => Param::Pm25,
        _ => Param::Ozone,
    }
}

impl Device {
    fn new(cfg: &SynthConfig, index: u32, site: &'static Site) -> Self {
        let mut rng = Pcg64::seed_from_u64(mix(cfg.seed ^ mix(u64::from(index) + 1)));
        let param = param_for(index);
        let info = param.info();
        // Devices sharing a site entry get distinct site numbers, so keys are unique.
        let site_num = format!(
            "{:04}",
            site.first_site_num + 10 * (index / SITES.len() as u32)
        );
        let key = format!(
            "{}-{}-{}-{}-1",
            site.state_code, site.county_code, site_num, info.code
        );
        let lat = format!("{:.6}", site.lat + uniform(&mut rng, (-0.05, 0.05)));
        let lon = format!("{:.6}", site.lon + uniform(&mut rng, (-0.05, 0.05)));
        let method = info.methods[rng.random_range(0..info.methods.len())];
        let hours = f64::from(cfg.interval_secs) / 3600.0;
        // Per-hour AR(1) coefficients turned into per-step ones so the model is interval-independent.
        let noise_phi = 0.6f64.powf(hours);
        let weather_phi = 0.97f64.powf(hours);
        let level = uniform(&mut rng, info.level);
        Device {
            key,
            param,
            site,
            site_num,
            lat,
            lon,
            method,
            certify_lag_days: rng.random_range(10..=45),
            level,
            diurnal_amp: uniform(&mut rng, info.diurnal),
            peak_shift: uniform(&mut rng, (-1.0, 1.0)),
            season_amp: uniform(&mut rng, info.season),
            drift_per_year: uniform(&mut rng, (-0.08, 0.08)),
            noise_sd: info.noise_rel * level,
            noise_phi,
            weather_phi,
            weather_innov_sd: info.weather_sd * (1.0 - weather_phi * weather_phi).sqrt(),
            anomalies: Vec::new(),
            outage: None,
            gap_prob: (0.004 * hours).min(0.2),
            rng,
            noise: 0.0,
            weather: 0.0,
            gap_left: 0,
            last_value: level,
            cached_month: None,
        }
    }

    /// Plans this device's anomalies in `count` equal segments after the clean period, and maybe
    /// one outage. Kinds come from the caller so every kind shows up across devices.
    fn plan(&mut self, cfg: &SynthConfig, kinds: &[AnomalyKind]) {
        let steps = cfg.steps();
        let to_steps =
            |hours: f64| ((hours * 3600.0 / f64::from(cfg.interval_secs)).round() as u32).max(1);
        let clean = (f64::from(steps) * CLEAN_FRACTION).ceil() as u32;
        let eligible = steps.saturating_sub(clean);
        let day = to_steps(24.0);
        let tail = to_steps(6.0);
        if !kinds.is_empty() {
            let seg_len = eligible / kinds.len() as u32;
            let mut shift_factor = 1.0f64;
            for (k, &kind) in kinds.iter().enumerate() {
                let seg_start = clean + k as u32 * seg_len;
                let rng = &mut self.rng;
                let (mut effect, size) = match kind {
                    AnomalyKind::Spike => (
                        rng.random_range(1..=2u32).min(to_steps(2.0)),
                        uniform(rng, self.param.info().spike),
                    ),
                    AnomalyKind::LevelShift => {
                        // Shifts alternate around the original level so repeated ones never
                        // compound into an implausible (or clipped) level.
                        let up = if shift_factor == 1.0 {
                            rng.random::<bool>()
                        } else {
                            shift_factor < 1.0
                        };
                        let factor = if up {
                            uniform(rng, (1.4, 1.8))
                        } else {
                            uniform(rng, (0.45, 0.65))
                        };
                        shift_factor *= factor;
                        (day, factor)
                    }
                    AnomalyKind::Flatline => (to_steps(uniform(rng, (8.0, 36.0))), 0.0),
                    AnomalyKind::PatternChange => (
                        to_steps(uniform(rng, (48.0, 120.0))),
                        uniform(rng, (8.0, 12.0)),
                    ),
                    AnomalyKind::NoiseBurst => (
                        to_steps(uniform(rng, (6.0, 24.0))),
                        uniform(rng, (5.0, 8.0)),
                    ),
                };
                let tail = if kind == AnomalyKind::LevelShift {
                    0
                } else {
                    tail
                };
                // Shrink long anomalies to fit short spans; drop them if even that fails.
                if effect + tail + 2 > seg_len {
                    effect = seg_len.saturating_sub(tail + 2);
                }
                if effect == 0 {
                    continue;
                }
                let window = effect + tail;
                let slack = seg_len - window - 1;
                let lo = seg_start + 1 + day.min(slack / 2);
                let start = self.rng.random_range(lo..=seg_start + 1 + slack);
                self.anomalies.push(Anomaly {
                    kind,
                    start,
                    effect_end: if kind == AnomalyKind::LevelShift {
                        steps
                    } else {
                        start + effect
                    },
                    label_end: start + window - 1,
                    size,
                });
            }
        }
        if self.rng.random::<f64>() < 0.35 {
            let len = to_steps(uniform(&mut self.rng, (12.0, 60.0)));
            let at = self.rng.random_range(0..steps);
            self.outage = Some((at, len));
        }
    }

    /// Steps around a labelled window never go missing, so every label covers real data.
    fn protected(&self, i: u32) -> bool {
        self.anomalies
            .iter()
            .any(|a| i + 1 >= a.start && i <= a.label_end)
    }

    /// Advances one step; `None` when this sample is missing.
    fn step(&mut self, cfg: &SynthConfig, i: u32, ts: i64) -> Option<f64> {
        let info = self.param.info();
        // Noise processes advance every step, observed or not, so gaps do not bend the series.
        self.noise = self.noise_phi * self.noise
            + self.noise_sd
                * (1.0 - self.noise_phi * self.noise_phi).sqrt()
                * normal(&mut self.rng);
        self.weather =
            self.weather_phi * self.weather + self.weather_innov_sd * normal(&mut self.rng);
        let gap_draw = self.rng.random::<f64>();
        let gap_len = self.rng.random_range(1..=3u32);
        let burst = normal(&mut self.rng);

        if let Some((at, len)) = self.outage {
            if i == at {
                self.gap_left = self.gap_left.max(len);
            }
        }
        if self.gap_left == 0 && gap_draw < self.gap_prob {
            self.gap_left = gap_len;
        }
        if self.gap_left > 0 {
            self.gap_left -= 1;
            if !self.protected(i) {
                return None;
            }
        }

        let local = ts + self.site.utc_offset_h * 3600;
        let dt = DateTime::from_timestamp(local, 0)?.naive_utc();
        let hour = f64::from(dt.hour()) + f64::from(dt.minute()) / 60.0;
        let doy = f64::from(dt.ordinal0());
        let weekday = dt.weekday().num_days_from_monday() as usize;
        let years = (ts - cfg.first_timestamp()) as f64 / (365.25 * 86_400.0);

        let mut shift = self.peak_shift;
        let mut level_factor = 1.0;
        let mut extra = 0.0;
        let mut flat = false;
        for a in &self.anomalies {
            if i < a.start || i >= a.effect_end {
                continue;
            }
            match a.kind {
                AnomalyKind::Spike => extra += a.size,
                AnomalyKind::LevelShift => level_factor *= a.size,
                AnomalyKind::Flatline => flat = true,
                AnomalyKind::PatternChange => shift += a.size,
                AnomalyKind::NoiseBurst => extra += a.size * self.noise_sd * burst,
            }
        }
        if flat {
            return Some(self.last_value);
        }
        let season = 1.0 + self.season_amp * (TAU * (doy - info.season_peak_doy) / 365.25).cos();
        let cycle = (1.0 + self.diurnal_amp * self.param.diurnal(hour, shift)).max(0.05);
        let base = self.level
            * season
            * info.weekly[weekday]
            * cycle
            * (1.0 + self.drift_per_year * years).max(0.1)
            * self.weather.exp()
            * level_factor;
        let raw = base + self.noise + extra;
        let scale = 10f64.powi(info.decimals as i32);
        // `<= 0` also catches -0.0, which would print as "-0.000".
        let value = if raw <= 0.0 {
            0.0
        } else {
            (raw.min(info.max) * scale).round() / scale
        };
        self.last_value = value;
        Some(value)
    }

    /// `dateOfLastChange`: data are certified a device-specific lag after their month ends.
    fn date_of_last_change(&mut self, year: i32, month: u32) -> &str {
        let stale = !matches!(&self.cached_month, Some((y, m, _)) if *y == year && *m == month);
        if stale {
            let text = NaiveDate::from_ymd_opt(year, month, 1)
                .and_then(|d| d.checked_add_months(Months::new(1)))
                .and_then(|d| d.checked_add_days(chrono::Days::new(self.certify_lag_days)))
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default();
            self.cached_month = Some((year, month, text));
        }
        self.cached_month
            .as_ref()
            .map_or("", |(_, _, s)| s.as_str())
    }
}

/// Builds the devices (sorted by key) with their anomaly plans.
fn build_devices(cfg: &SynthConfig) -> Vec<Device> {
    let mut master = Pcg64::seed_from_u64(mix(cfg.seed));
    let mut site_order: Vec<usize> = (0..SITES.len()).collect();
    site_order.shuffle(&mut master);
    let mut kind_order = AnomalyKind::ALL;
    kind_order.shuffle(&mut master);

    let mut devices: Vec<Device> = (0..cfg.devices)
        .map(|i| Device::new(cfg, i, &SITES[site_order[i as usize % SITES.len()]]))
        .collect();
    devices.sort_by(|a, b| a.key.cmp(&b.key));

    let steps = cfg.steps();
    let clean = (f64::from(steps) * CLEAN_FRACTION).ceil() as u32;
    let eligible_days = f64::from(steps - clean) * f64::from(cfg.interval_secs) / 86_400.0;
    let per_device = ((eligible_days / 12.0).round() as usize).clamp(1, 6);
    // Kinds rotate over all (device, slot) pairs so each kind appears once there are ≥ 5 slots.
    let mut counter = 0usize;
    for dev in &mut devices {
        let kinds: Vec<AnomalyKind> = (0..per_device)
            .map(|_| {
                counter += 1;
                kind_order[(counter - 1) % kind_order.len()]
            })
            .collect();
        dev.plan(cfg, &kinds);
    }
    devices
}

/// Generates the data set: EPA CSV (header + rows ordered by time, then device key) to `out`.
/// Returns the labels and counts.
pub fn generate<W: Write>(cfg: &SynthConfig, out: W) -> Result<SynthSummary, SynthError> {
    cfg.validate()?;
    let mut devices = build_devices(cfg);
    let mut wtr = csv::WriterBuilder::new()
        .buffer_capacity(1 << 16)
        .from_writer(out);
    wtr.write_record(EPA_COLUMNS)?;

    let first = cfg.first_timestamp();
    let interval = i64::from(cfg.interval_secs);
    let (mut rows, mut missing) = (0u64, 0u64);
    let mut value_text = String::new();
    for i in 0..cfg.steps() {
        let ts = first + i64::from(i) * interval;
        let gmt = DateTime::from_timestamp(ts, 0)
            .ok_or_else(|| invalid("start", "timestamp out of range"))?
            .naive_utc();
        let date_gmt = gmt.format("%Y-%m-%d").to_string();
        let time_gmt = gmt.format("%H:%M").to_string();
        for dev in &mut devices {
            let Some(value) = dev.step(cfg, i, ts) else {
                missing += 1;
                continue;
            };
            let info = dev.param.info();
            value_text.clear();
            let _ = write!(value_text, "{:.*}", info.decimals, value);
            let local = DateTime::from_timestamp(ts + dev.site.utc_offset_h * 3600, 0)
                .ok_or_else(|| invalid("start", "timestamp out of range"))?
                .naive_utc();
            let date_local = local.format("%Y-%m-%d").to_string();
            let time_local = local.format("%H:%M").to_string();
            let changed = dev
                .date_of_last_change(local.year(), local.month())
                .to_string();
            let site = dev.site;
            wtr.write_record([
                site.state_code,
                site.county_code,
                dev.site_num.as_str(),
                info.code,
                "1",
                dev.lat.as_str(),
                dev.lon.as_str(),
                site.datum,
                info.name,
                date_local.as_str(),
                time_local.as_str(),
                date_gmt.as_str(),
                time_gmt.as_str(),
                value_text.as_str(),
                info.units,
                info.mdl,
                "",
                "",
                info.method_type,
                dev.method.0,
                dev.method.1,
                site.state_name,
                site.county_name,
                changed.as_str(),
            ])?;
            rows += 1;
        }
    }
    wtr.flush()?;

    let labels: Labels = devices
        .iter()
        .map(|d| {
            let windows = d
                .anomalies
                .iter()
                .map(|a| Label {
                    kind: a.kind,
                    start: rfc3339(first + i64::from(a.start) * interval),
                    end: rfc3339(first + i64::from(a.label_end) * interval),
                })
                .collect();
            (d.key.clone(), windows)
        })
        .collect();
    Ok(SynthSummary {
        rows,
        missing,
        devices: devices.iter().map(|d| d.key.clone()).collect(),
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{parse_timestamp, Format, InputRecord, RecordReader};

    fn run(cfg: &SynthConfig) -> (Vec<u8>, SynthSummary) {
        let mut buf = Vec::new();
        let summary = generate(cfg, &mut buf).expect("generate");
        (buf, summary)
    }

    fn parse(buf: &[u8]) -> Vec<InputRecord> {
        let reader = RecordReader::new(buf, None, "x").expect("header");
        assert_eq!(reader.format(), Format::Epa);
        reader
            .map(|r| r.expect("synthetic rows are all valid"))
            .collect()
    }

    fn cfg(devices: u32, days: u32, seed: u64) -> SynthConfig {
        SynthConfig {
            devices,
            days,
            seed,
            ..SynthConfig::default()
        }
    }

    #[test]
    fn same_seed_gives_identical_bytes_and_different_seed_differs() {
        let c = cfg(5, 20, 42);
        let (a, la) = run(&c);
        let (b, lb) = run(&c);
        assert_eq!(a, b);
        assert_eq!(la, lb);
        let mut ja = Vec::new();
        let mut jb = Vec::new();
        write_labels(&la.labels, &mut ja).expect("labels");
        write_labels(&lb.labels, &mut jb).expect("labels");
        assert_eq!(ja, jb);
        let (c2, _) = run(&cfg(5, 20, 43));
        assert_ne!(a, c2);
    }

    #[test]
    fn rows_are_ordered_by_time_then_device_and_counts_add_up() {
        let c = cfg(7, 15, 3);
        let (buf, summary) = run(&c);
        let recs = parse(&buf);
        assert_eq!(recs.len() as u64, summary.rows);
        assert_eq!(summary.rows + summary.missing, u64::from(c.steps()) * 7);
        for w in recs.windows(2) {
            assert!(
                (w[0].timestamp, &w[0].device_id) < (w[1].timestamp, &w[1].device_id),
                "{:?} then {:?}",
                (w[0].timestamp, &w[0].device_id),
                (w[1].timestamp, &w[1].device_id)
            );
        }
        let mut keys = summary.devices.clone();
        keys.dedup();
        assert_eq!(keys.len(), 7, "device keys are unique");
        assert_eq!(recs[0].timestamp, c.first_timestamp());
    }

    #[test]
    fn values_are_realistic_per_parameter() {
        let (buf, _) = run(&cfg(15, 120, 11));
        let recs = parse(&buf);
        let mut by_param: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in &recs {
            let f = r.fields.as_ref().expect("EPA fields");
            by_param
                .entry(f.parameter_code.clone())
                .or_default()
                .push(r.value);
            // Three decimals like EPA data (one for PM2.5).
            let decimals = f.sample_measurement.split('.').nth(1).map_or(0, str::len);
            assert_eq!(
                decimals,
                if f.parameter_code == "88101" { 1 } else { 3 },
                "{}",
                f.sample_measurement
            );
            assert!(!f.sample_measurement.starts_with('-'));
        }
        let stats = |code: &str| {
            let v = &by_param[code];
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            (min, mean, max)
        };
        let (min, mean, max) = stats("44201");
        assert!(min >= 0.0 && max <= 0.15, "ozone {min}..{max}");
        assert!((0.015..0.045).contains(&mean), "ozone mean {mean}");
        let (min, mean, max) = stats("42101");
        assert!(
            min >= 0.0 && max <= 20.0 && (0.1..1.5).contains(&mean),
            "CO {min} {mean} {max}"
        );
        let (min, mean, max) = stats("88101");
        assert!(
            min >= 0.0 && max <= 500.0 && (3.0..25.0).contains(&mean),
            "PM {min} {mean} {max}"
        );
    }

    #[test]
    fn ozone_peaks_in_the_afternoon() {
        let (buf, _) = run(&cfg(5, 60, 5));
        let mut sum = [0.0f64; 24];
        let mut n = [0u32; 24];
        for r in parse(&buf) {
            let f = r.fields.as_ref().expect("EPA fields");
            if f.parameter_code == "44201" {
                let h: usize = f.time_local[..2].parse().expect("hour");
                sum[h] += r.value;
                n[h] += 1;
            }
        }
        let mean: Vec<f64> = (0..24).map(|h| sum[h] / f64::from(n[h])).collect();
        let peak = (0..24)
            .max_by(|&a, &b| mean[a].total_cmp(&mean[b]))
            .expect("24 hours");
        assert!(
            (12..=17).contains(&peak),
            "ozone peak hour {peak}: {mean:?}"
        );
        assert!(mean[peak] > 1.5 * mean[5], "diurnal contrast {mean:?}");
    }

    #[test]
    fn gaps_are_present_but_rare() {
        let c = cfg(10, 60, 9);
        let (buf, summary) = run(&c);
        let recs = parse(&buf);
        assert!(summary.missing > 0, "some samples are missing");
        let expected = u64::from(c.steps()) * 10;
        assert!(
            summary.missing * 20 < expected,
            "missing {} of {expected}",
            summary.missing
        );
        // Gaps are visible in the data: some device has consecutive rows more than an hour apart.
        let mut last: BTreeMap<&str, i64> = BTreeMap::new();
        let mut gaps = 0;
        for r in &recs {
            if let Some(prev) = last.insert(&r.device_id, r.timestamp) {
                if r.timestamp - prev > 3600 {
                    gaps += 1;
                }
            }
        }
        assert!(gaps > 0);
    }

    #[test]
    fn labels_lie_inside_the_data_after_the_clean_period() {
        let c = cfg(12, 45, 21);
        let (buf, summary) = run(&c);
        let recs = parse(&buf);
        let first = c.first_timestamp();
        let last = c.last_timestamp();
        let clean_end = first + ((last - first) as f64 * 0.15) as i64;
        let mut times: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for r in &recs {
            times.entry(&r.device_id).or_default().push(r.timestamp);
        }
        assert_eq!(summary.labels.len(), 12, "every device has a labels entry");
        let mut total = 0;
        for (key, windows) in &summary.labels {
            let ts = &times[key.as_str()];
            assert!(!windows.is_empty(), "{key} has anomalies");
            for w in windows {
                let (s, e) = (
                    parse_timestamp(&w.start).expect("start"),
                    parse_timestamp(&w.end).expect("end"),
                );
                assert!(clean_end <= s && s <= e && e <= last, "{key} {w:?}");
                // No gaps inside a window: every slot of it is a row.
                let inside = ts.iter().filter(|&&t| s <= t && t <= e).count() as i64;
                assert_eq!(inside, (e - s) / 3600 + 1, "{key} {w:?}");
                total += 1;
            }
            for pair in windows.windows(2) {
                assert!(
                    pair[0].end < pair[1].start,
                    "windows do not overlap: {pair:?}"
                );
            }
        }
        assert!(total >= 12);
    }

    #[test]
    fn all_kinds_appear_and_change_the_data() {
        let c = cfg(8, 60, 4);
        let (buf, summary) = run(&c);
        let recs = parse(&buf);
        let mut series: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
        for r in &recs {
            series
                .entry(&r.device_id)
                .or_default()
                .push((r.timestamp, r.value));
        }
        let mut seen = BTreeMap::new();
        for (key, windows) in &summary.labels {
            let s = &series[key.as_str()];
            for w in windows {
                *seen.entry(w.kind).or_insert(0) += 1;
                let start = parse_timestamp(&w.start).expect("start");
                let at = s
                    .iter()
                    .position(|&(t, _)| t == start)
                    .expect("window start is a row");
                match w.kind {
                    AnomalyKind::Spike => {
                        // Far above everything in the surrounding day.
                        let around: Vec<f64> = s[at.saturating_sub(24)..at - 1]
                            .iter()
                            .map(|p| p.1)
                            .collect();
                        let max_before = around.iter().cloned().fold(0.0, f64::max);
                        assert!(
                            s[at].1 > max_before * 1.3,
                            "{key} spike {} vs {max_before}",
                            s[at].1
                        );
                    }
                    AnomalyKind::Flatline => {
                        // At least 8 identical values in a row.
                        assert!(
                            s[at..at + 8].iter().all(|p| p.1 == s[at - 1].1),
                            "{key} flatline"
                        );
                    }
                    _ => {}
                }
            }
        }
        for kind in AnomalyKind::ALL {
            assert!(
                seen.get(&kind).copied().unwrap_or(0) >= 2,
                "{kind:?} appears: {seen:?}"
            );
        }
    }

    #[test]
    fn other_intervals_and_short_spans_work() {
        let c = SynthConfig {
            devices: 3,
            days: 3,
            interval_secs: 900,
            seed: 1,
            ..SynthConfig::default()
        };
        let (buf, summary) = run(&c);
        let recs = parse(&buf);
        assert_eq!(summary.rows as usize, recs.len());
        assert!(recs.windows(2).all(|w| w[1].timestamp >= w[0].timestamp));
        assert!(recs.iter().any(|r| r.timestamp % 3600 == 900));
        for windows in summary.labels.values() {
            for w in windows {
                assert!(parse_timestamp(&w.end).expect("end") <= c.last_timestamp());
            }
        }
    }

    #[test]
    fn config_validation_names_the_parameter() {
        let bad = SynthConfig {
            interval_secs: 90,
            ..SynthConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("invalid interval"));
        let bad = SynthConfig {
            devices: 0,
            ..SynthConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("invalid devices"));
        assert!(generate(&bad, Vec::new()).is_err());
        assert_eq!(parse_interval("1h").ok(), Some(3600));
        assert_eq!(parse_interval("15m").ok(), Some(900));
        assert_eq!(parse_interval("1d").ok(), Some(86_400));
        assert_eq!(parse_interval("120").ok(), Some(120));
        assert!(parse_interval("1w").is_err());
        assert!(parse_interval("h").is_err());
    }
}
