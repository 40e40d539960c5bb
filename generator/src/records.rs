//! The three input formats (EPA hourly CSV, generic telemetry CSV, NAB-style CSV), parsed into one
//! [`InputRecord`], plus the JSON form records take on the wire.
//!
//! Reading is streaming: [`RecordReader`] yields one `Result<InputRecord, RowError>` per data row so a
//! caller (inspect, or a Kafka loader) can count and report bad rows without ever losing one silently.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::marker::PhantomData;
use std::path::Path;

use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat};
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::csvline::{CsvLines, Next};

/// Declares [`EpaFields`] and [`EPA_COLUMNS`] from one list so the struct, the CSV column order and the
/// JSON names can never drift apart.
macro_rules! epa_fields {
    ($( $(#[$doc:meta])* $field:ident => $name:literal ),* $(,)?) => {
        /// The 24 string columns of an EPA hourly record, in file order. Serialised with the original
        /// camelCase names so the JSON on the wire matches the original system's `MonitoringRecord`.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct EpaFields {
            $( $(#[$doc])* #[serde(rename = $name)] pub $field: String, )*
        }

        /// The EPA column names in file order (also the JSON field names).
        pub const EPA_COLUMNS: [&str; 24] = [ $( $name ),* ];

        impl EpaFields {
            /// The 24 values in column order.
            pub fn values(&self) -> [&str; 24] {
                [ $( self.$field.as_str() ),* ]
            }

            /// Builds the struct by asking `f` for each column, in column order.
            fn from_fn(mut f: impl FnMut(&'static str) -> String) -> Self {
                // Struct expressions evaluate their fields in source order, which is column order.
                Self { $( $field: f($name), )* }
            }
        }

        /// Every field either record kind may carry on the wire, borrowed from the input.
        #[derive(Deserialize)]
        struct Wire<'a> {
            $( #[serde(borrow, rename = $name)] $field: Option<Loose<'a>>, )*
            #[serde(borrow)]
            timestamp: Option<Loose<'a>>,
            #[serde(borrow, rename = "deviceId")]
            device_id: Option<Loose<'a>>,
            #[serde(borrow)]
            value: Option<Loose<'a>>,
        }

        impl<'a> Wire<'a> {
            /// An object with `stateCode` or `sampleMeasurement` is an EPA record.
            fn is_epa(&self) -> bool {
                self.state_code.is_some() || self.sample_measurement.is_some()
            }

            /// The EPA fields in column order.
            fn epa_columns(self) -> [Option<Loose<'a>>; 24] {
                [ $( self.$field ),* ]
            }
        }
    };
}

epa_fields! {
    /// Two-digit FIPS state code, e.g. `10`.
    state_code => "stateCode",
    /// Three-digit FIPS county code, e.g. `001`.
    county_code => "countyCode",
    /// Four-digit site number within the county, e.g. `0002`.
    site_num => "siteNum",
    /// AQS parameter code, e.g. `44201` (ozone).
    parameter_code => "parameterCode",
    /// Parameter occurrence code (instrument number at the site).
    poc => "poc",
    /// Site latitude in decimal degrees.
    latitude => "latitude",
    /// Site longitude in decimal degrees.
    longitude => "longitude",
    /// Geodetic datum of the coordinates, e.g. `WGS84`.
    datum => "datum",
    /// Human-readable parameter name, e.g. `Ozone`.
    parameter_name => "parameterName",
    /// Local-standard-time date `YYYY-MM-DD`.
    date_local => "dateLocal",
    /// Local-standard-time hour `HH:MM`.
    time_local => "timeLocal",
    /// UTC date `YYYY-MM-DD`.
    date_gmt => "dateGMT",
    /// UTC hour `HH:MM`.
    time_gmt => "timeGMT",
    /// The measured value (the record's value).
    sample_measurement => "sampleMeasurement",
    /// Units of `sampleMeasurement`, e.g. `Parts per million`.
    units_of_measure => "unitsOfMeasure",
    /// Method detection limit.
    mdl => "mdl",
    /// Measurement uncertainty (often empty).
    uncertainty => "uncertainty",
    /// Data qualifier code (often empty).
    qualifier => "qualifier",
    /// FRM/FEM/non-FRM.
    method_type => "methodType",
    /// AQS method code.
    method_code => "methodCode",
    /// Method description.
    method_name => "methodName",
    /// State name.
    state_name => "stateName",
    /// County name.
    county_name => "countyName",
    /// Date the record last changed in AQS.
    date_of_last_change => "dateOfLastChange",
}

/// Columns that make up an EPA device key, in key order.
const EPA_KEY_COLUMNS: [&str; 5] = ["stateCode", "countyCode", "siteNum", "parameterCode", "poc"];

/// Input file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Format {
    /// EPA hourly CSV: 24 columns, key `stateCode-countyCode-siteNum-parameterCode-poc`.
    Epa,
    /// Generic telemetry CSV `timestamp,device_id,value`.
    Generic,
    /// NAB-style CSV `timestamp,value`; the device id is the file stem.
    Nab,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Epa => "epa",
            Format::Generic => "generic",
            Format::Nab => "nab",
        })
    }
}

/// One telemetry reading, whatever format it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputRecord {
    /// Kafka key: EPA `stateCode-countyCode-siteNum-parameterCode-poc`, generic `device_id`, NAB file stem.
    pub device_id: String,
    /// UTC epoch seconds.
    pub timestamp: i64,
    /// The measurement; always finite.
    pub value: f64,
    /// The original EPA columns (`None` for generic and NAB records).
    pub fields: Option<Box<EpaFields>>,
}

/// Wire form of a generic/NAB record; borrowed so serialising allocates only the timestamp string.
#[derive(Serialize)]
struct GenericWire<'a> {
    timestamp: String,
    #[serde(rename = "deviceId")]
    device_id: &'a str,
    value: f64,
}

impl InputRecord {
    /// The Kafka message key (the device id).
    pub fn key(&self) -> &str {
        &self.device_id
    }

    /// Appends the wire JSON to `out` (lets a loader reuse one buffer per message).
    ///
    /// EPA records become exactly the 24 original fields; generic/NAB records become
    /// `{"timestamp": "<RFC3339>", "deviceId": ..., "value": ...}`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // Only strings and finite floats are serialised into a Vec, which cannot fail.
        let res = match &self.fields {
            Some(fields) => serde_json::to_writer(&mut *out, fields),
            None => serde_json::to_writer(
                &mut *out,
                &GenericWire {
                    timestamp: rfc3339(self.timestamp),
                    device_id: &self.device_id,
                    value: self.value,
                },
            ),
        };
        res.expect("serialising strings and finite numbers into memory cannot fail");
    }

    /// The wire JSON as a string (see [`InputRecord::write_json`]).
    pub fn to_json(&self) -> String {
        let mut buf = Vec::with_capacity(512);
        self.write_json(&mut buf);
        String::from_utf8(buf).expect("serde_json emits UTF-8")
    }

    /// Parses the wire JSON produced by [`InputRecord::to_json`] (or by the original system).
    ///
    /// An object with `stateCode` or `sampleMeasurement` is taken as EPA; EPA fields other than the
    /// key, `dateGMT`, `timeGMT` and `sampleMeasurement` may be absent or null (read as empty).
    /// Otherwise `timestamp` (string in any accepted form, or epoch seconds/milliseconds number),
    /// `deviceId` and `value` (finite number or numeric string) are required.
    pub fn from_json(bytes: &[u8]) -> Result<InputRecord, JsonError> {
        record_from_json(bytes, true)
    }

    /// Like [`InputRecord::from_json`] with the same validation and errors, but without keeping
    /// the EPA columns (`fields` is always `None`), which skips copying 24 strings per EPA record;
    /// for consumers that only need key, time and value.
    pub fn reading_from_json(bytes: &[u8]) -> Result<InputRecord, JsonError> {
        record_from_json(bytes, false)
    }
}

/// Why a JSON record could not be turned into an [`InputRecord`].
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Not valid JSON at all.
    #[error("malformed JSON: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Valid JSON but not an object.
    #[error("JSON record is not an object")]
    NotObject,
    /// A required field is absent or null.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// A field is present but unusable.
    #[error("bad field `{field}`: {reason}")]
    Bad {
        /// The field's wire name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// A data row that could not be parsed. Never dropped silently: the reader yields it in place of
/// the record so callers can count and report it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct RowError {
    /// 1-based line number in the file where the row starts.
    pub line: u64,
    /// Human-readable cause, naming the column.
    pub reason: String,
}

/// A problem with one named field of a record (shared by the CSV and JSON paths).
#[derive(Debug)]
struct FieldError {
    field: &'static str,
    reason: String,
}

impl FieldError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl From<FieldError> for JsonError {
    fn from(e: FieldError) -> Self {
        JsonError::Bad {
            field: e.field,
            reason: e.reason,
        }
    }
}

/// Why a file could not be opened as a record source at all (as opposed to a bad row).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file could not be opened.
    #[error("cannot open {path}: {source}")]
    Io {
        /// Path as given.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The header row could not be read.
    #[error("cannot read the header row: {0}")]
    Read(#[from] std::io::Error),
    /// The header row is not valid CSV text.
    #[error("bad header row: {0}")]
    BadHeader(String),
    /// The file has no header row.
    #[error("empty input (no header row)")]
    Empty,
    /// The header matches no known format and no `--format` was given.
    #[error("unrecognised header `{0}`: expected EPA (24 columns stateCode..dateOfLastChange), `timestamp,device_id,value` or `timestamp,value` (or pass --format)")]
    UnknownHeader(String),
    /// The header lacks a column the requested format needs.
    #[error("header `{header}` has no `{column}` column required by format {format}")]
    MissingColumn {
        /// Header as read.
        header: String,
        /// The requested format.
        format: Format,
        /// The missing column.
        column: &'static str,
    },
}

/// Where the needed columns sit in a row.
#[derive(Clone, Copy, Debug)]
enum Layout {
    Epa,
    Generic {
        ts: usize,
        dev: usize,
        val: usize,
        width: usize,
    },
    Nab {
        ts: usize,
        val: usize,
        width: usize,
    },
}

/// Lower-cases and strips everything but letters and digits, so `State Code`, `stateCode` and
/// `state_code` (and a UTF-8 BOM) all compare equal.
fn normalise(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn find(norm: &[String], names: &[&str]) -> Option<usize> {
    norm.iter().position(|h| names.contains(&h.as_str()))
}

const TS_NAMES: [&str; 4] = ["timestamp", "time", "datetime", "ts"];
const DEV_NAMES: [&str; 3] = ["deviceid", "device", "id"];
const VAL_NAMES: [&str; 1] = ["value"];

fn is_epa_header(norm: &[String]) -> bool {
    norm.len() == EPA_COLUMNS.len()
        && norm
            .iter()
            .zip(EPA_COLUMNS)
            .all(|(h, name)| *h == normalise(name))
}

/// Picks the format (unless forced) and the column layout from the header row.
fn layout_for(headers: &[String], forced: Option<Format>) -> Result<(Format, Layout), OpenError> {
    let norm: Vec<String> = headers.iter().map(|h| normalise(h)).collect();
    let header_text = || headers.join(",");
    let ts = find(&norm, &TS_NAMES);
    let dev = find(&norm, &DEV_NAMES);
    let val = find(&norm, &VAL_NAMES);
    let width = norm.len();
    let format = match forced {
        Some(f) => f,
        None if is_epa_header(&norm) => Format::Epa,
        None => match (ts, dev, val) {
            (Some(_), Some(_), Some(_)) => Format::Generic,
            (Some(_), None, Some(_)) => Format::Nab,
            _ => return Err(OpenError::UnknownHeader(header_text())),
        },
    };
    let layout = match format {
        // EPA is positional: the original files and ours share one column order.
        Format::Epa => Layout::Epa,
        Format::Generic => match (ts, dev, val) {
            (Some(ts), Some(dev), Some(val)) => Layout::Generic {
                ts,
                dev,
                val,
                width,
            },
            // Forced on an unnamed header: fall back to the documented column order.
            (None, None, None) if width >= 3 => Layout::Generic {
                ts: 0,
                dev: 1,
                val: 2,
                width,
            },
            (t, d, _) => {
                let column = if t.is_none() {
                    "timestamp"
                } else if d.is_none() {
                    "device_id"
                } else {
                    "value"
                };
                return Err(OpenError::MissingColumn {
                    header: header_text(),
                    format,
                    column,
                });
            }
        },
        Format::Nab => match (ts, val) {
            (Some(ts), Some(val)) => Layout::Nab { ts, val, width },
            (None, None) if width >= 2 => Layout::Nab {
                ts: 0,
                val: 1,
                width,
            },
            (t, _) => {
                return Err(OpenError::MissingColumn {
                    header: header_text(),
                    format,
                    column: if t.is_none() { "timestamp" } else { "value" },
                })
            }
        },
    };
    Ok((format, layout))
}

/// Streaming reader: one `Result<InputRecord, RowError>` per data row, in file order.
pub struct RecordReader<R> {
    lines: CsvLines<R>,
    format: Format,
    layout: Layout,
    nab_device: String,
    done: bool,
}

impl RecordReader<BufReader<File>> {
    /// Opens a file; the NAB device id is the file stem.
    pub fn from_path(path: impl AsRef<Path>, format: Option<Format>) -> Result<Self, OpenError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| OpenError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        RecordReader::new(BufReader::with_capacity(1 << 16, file), format, &stem)
    }
}

impl<R: BufRead> RecordReader<R> {
    /// Reads the header row (the first non-blank line) and decides the format (`format` overrides
    /// detection). `nab_device_id` is the device id given to NAB-format rows.
    pub fn new(reader: R, format: Option<Format>, nab_device_id: &str) -> Result<Self, OpenError> {
        let mut lines = CsvLines::new(reader);
        let header: Vec<String> = match lines.next_record()? {
            Next::Record(_) => lines.fields().map(str::to_string).collect(),
            Next::Bad(_, why) => return Err(OpenError::BadHeader(why)),
            Next::Eof => return Err(OpenError::Empty),
        };
        let (format, layout) = layout_for(&header, format)?;
        Ok(Self {
            lines,
            format,
            layout,
            nab_device: nab_device_id.to_string(),
            done: false,
        })
    }

    /// The format in use (detected or forced).
    pub fn format(&self) -> Format {
        self.format
    }

    fn parse_row(&self) -> Result<InputRecord, String> {
        let row = &self.lines;
        match self.layout {
            Layout::Epa => {
                if row.len() != EPA_COLUMNS.len() {
                    return Err(width_error(row.len(), EPA_COLUMNS.len(), &EPA_COLUMNS));
                }
                let mut cols = row.fields();
                let fields = EpaFields::from_fn(|_| cols.next().unwrap_or("").to_string());
                epa_record(fields).map_err(|e| e.to_string())
            }
            Layout::Generic {
                ts,
                dev,
                val,
                width,
            } => {
                if row.len() != width {
                    let mut order = [(ts, "timestamp"), (dev, "device_id"), (val, "value")];
                    order.sort_unstable();
                    return Err(width_error_named(row.len(), width, &order));
                }
                let device = row.field(dev).trim();
                if device.is_empty() {
                    return Err("device_id: empty".into());
                }
                Ok(InputRecord {
                    device_id: device.to_string(),
                    timestamp: parse_timestamp(row.field(ts))
                        .map_err(|r| FieldError::new("timestamp", r).to_string())?,
                    value: parse_value(row.field(val), "value").map_err(|e| e.to_string())?,
                    fields: None,
                })
            }
            Layout::Nab { ts, val, width } => {
                if row.len() != width {
                    let mut order = [(ts, "timestamp"), (val, "value")];
                    order.sort_unstable();
                    return Err(width_error_named(row.len(), width, &order));
                }
                Ok(InputRecord {
                    device_id: self.nab_device.clone(),
                    timestamp: parse_timestamp(row.field(ts))
                        .map_err(|r| FieldError::new("timestamp", r).to_string())?,
                    value: parse_value(row.field(val), "value").map_err(|e| e.to_string())?,
                    fields: None,
                })
            }
        }
    }
}

fn width_error(found: usize, expected: usize, names: &[&str]) -> String {
    if found < expected {
        format!(
            "expected {expected} columns, found {found} (missing `{}`)",
            names[found..].join("`, `")
        )
    } else {
        format!("expected {expected} columns, found {found}")
    }
}

/// Like [`width_error`] for layouts located by name: lists the needed columns that are cut off.
fn width_error_named(found: usize, expected: usize, cols: &[(usize, &str)]) -> String {
    let missing: Vec<&str> = cols
        .iter()
        .filter(|(i, _)| *i >= found)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        format!("expected {expected} columns, found {found}")
    } else {
        format!(
            "expected {expected} columns, found {found} (missing `{}`)",
            missing.join("`, `")
        )
    }
}

impl<R: BufRead> Iterator for RecordReader<R> {
    type Item = Result<InputRecord, RowError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.lines.next_record() {
            Ok(Next::Record(line)) => {
                Some(self.parse_row().map_err(|reason| RowError { line, reason }))
            }
            Ok(Next::Bad(line, reason)) => Some(Err(RowError { line, reason })),
            Ok(Next::Eof) => {
                self.done = true;
                None
            }
            Err(e) => {
                // A read error would likely repeat forever: report it once, then stop.
                self.done = true;
                Some(Err(RowError {
                    line: self.lines.line() + 1,
                    reason: format!("read error: {e}"),
                }))
            }
        }
    }
}

/// Builds a record from EPA columns: key from the five key columns, time from dateGMT+timeGMT,
/// value from sampleMeasurement.
fn epa_record(fields: EpaFields) -> Result<InputRecord, FieldError> {
    let (device_id, timestamp, value) = epa_core(
        [
            &fields.state_code,
            &fields.county_code,
            &fields.site_num,
            &fields.parameter_code,
            &fields.poc,
        ],
        &fields.date_gmt,
        &fields.time_gmt,
        &fields.sample_measurement,
    )?;
    Ok(InputRecord {
        device_id,
        timestamp,
        value,
        fields: Some(Box::new(fields)),
    })
}

/// Device key, UTC time and value from the EPA columns that define them.
fn epa_core(
    key: [&str; 5],
    date_gmt: &str,
    time_gmt: &str,
    sample: &str,
) -> Result<(String, i64, f64), FieldError> {
    let key = key.map(str::trim);
    for (part, name) in key.iter().zip(EPA_KEY_COLUMNS) {
        if part.is_empty() {
            return Err(FieldError::new(name, "empty (needed for the device key)"));
        }
    }
    let date = parse_date(date_gmt.trim()).ok_or_else(|| {
        FieldError::new(
            "dateGMT",
            format!("bad date `{date_gmt}` (expected YYYY-MM-DD)"),
        )
    })?;
    let time = parse_hm(time_gmt.trim()).ok_or_else(|| {
        FieldError::new("timeGMT", format!("bad time `{time_gmt}` (expected HH:MM)"))
    })?;
    let timestamp = date.and_time(time).and_utc().timestamp();
    let value = parse_value(sample, "sampleMeasurement")?;
    Ok((key.join("-"), timestamp, value))
}

fn parse_value(raw: &str, field: &'static str) -> Result<f64, FieldError> {
    let s = raw.trim();
    if s.is_empty() {
        return Err(FieldError::new(field, "missing value"));
    }
    let v: f64 = s
        .parse()
        .map_err(|_| FieldError::new(field, format!("not a number: `{s}`")))?;
    if !v.is_finite() {
        return Err(FieldError::new(
            field,
            format!("not a finite number: `{s}`"),
        ));
    }
    Ok(v)
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')))
}

/// `YYYY-MM-DD`.
fn parse_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    NaiveDate::from_ymd_opt(
        digits(&b[0..4])? as i32,
        digits(&b[5..7])?,
        digits(&b[8..10])?,
    )
}

/// `HH:MM` or `HH:MM:SS`.
fn parse_hm(s: &str) -> Option<NaiveTime> {
    let b = s.as_bytes();
    match b.len() {
        5 if b[2] == b':' => NaiveTime::from_hms_opt(digits(&b[0..2])?, digits(&b[3..5])?, 0),
        8 if b[2] == b':' && b[5] == b':' => {
            NaiveTime::from_hms_opt(digits(&b[0..2])?, digits(&b[3..5])?, digits(&b[6..8])?)
        }
        _ => None,
    }
}

/// Parses a timestamp to UTC epoch seconds (sub-seconds are dropped). Accepted:
/// epoch seconds, epoch milliseconds (13+ digits), ISO-8601/RFC 3339 `YYYY-MM-DDTHH:MM[:SS[.f]]`
/// with `T` or a space, with an optional `Z` / `±HH[:MM]` offset (no offset means UTC), and a bare
/// `YYYY-MM-DD` (midnight UTC).
pub fn parse_timestamp(raw: &str) -> Result<i64, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("missing value".into());
    }
    let bad = || {
        format!(
            "bad timestamp `{s}` (expected ISO-8601, `YYYY-MM-DD HH:MM:SS`, or epoch seconds/milliseconds)"
        )
    };
    let unsigned = s.strip_prefix('-').unwrap_or(s);
    let ts = if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = s.parse().map_err(|_| bad())?;
        epoch_number(n, unsigned.len() >= 13)
    } else {
        parse_iso(s.as_bytes()).ok_or_else(bad)?
    };
    if DateTime::from_timestamp(ts, 0).is_none() {
        return Err(format!("timestamp `{s}` is out of range"));
    }
    Ok(ts)
}

/// Epoch seconds, or milliseconds floored to seconds.
fn epoch_number(n: i64, millis: bool) -> i64 {
    if millis {
        n.div_euclid(1000)
    } else {
        n
    }
}

fn parse_iso(b: &[u8]) -> Option<i64> {
    let date = parse_date(std::str::from_utf8(b.get(..10)?).ok()?)?;
    if b.len() == 10 {
        return Some(date.and_time(NaiveTime::MIN).and_utc().timestamp());
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let rest = &b[11..];
    let hour = digits(rest.get(0..2)?)?;
    if *rest.get(2)? != b':' {
        return None;
    }
    let minute = digits(rest.get(3..5)?)?;
    let mut i = 5;
    let mut second = 0;
    if rest.get(i) == Some(&b':') {
        second = digits(rest.get(i + 1..i + 3)?)?;
        i += 3;
        if matches!(rest.get(i), Some(b'.' | b',')) {
            i += 1;
            let start = i;
            while rest.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return None;
            }
        }
    }
    let offset_secs: i64 = match rest.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == rest.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let tz = &rest[i + 1..];
            let (h, m) = match tz.len() {
                2 => (digits(tz)?, 0),
                4 => (digits(&tz[0..2])?, digits(&tz[2..4])?),
                5 if tz[2] == b':' => (digits(&tz[0..2])?, digits(&tz[3..5])?),
                _ => return None,
            };
            if h > 23 || m > 59 {
                return None;
            }
            let secs = i64::from(h * 3600 + m * 60);
            if sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    let time = NaiveTime::from_hms_opt(hour, minute, second)?;
    Some(date.and_time(time).and_utc().timestamp() - offset_secs)
}

/// Formats epoch seconds as RFC 3339 UTC with a `Z` suffix, e.g. `2014-01-01T05:00:00Z`.
pub fn rfc3339(ts: i64) -> String {
    match DateTime::from_timestamp(ts, 0) {
        Some(dt) => dt.to_rfc3339_opts(SecondsFormat::Secs, true),
        // Unreachable for parsed records (parse_timestamp rejects out-of-range values).
        None => ts.to_string(),
    }
}

/// A JSON value as the lenient wire reader sees it: strings stay borrowed when unescaped, nested
/// values are skipped, so parsing a record allocates little.
#[derive(Debug)]
enum Loose<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    UInt(u64),
    Float(f64),
    /// Anything else, by description (for the error message).
    Other(&'static str),
}

impl Loose<'_> {
    fn describe(&self) -> String {
        match self {
            Loose::Str(s) => format!("\"{s}\""),
            Loose::Int(i) => i.to_string(),
            Loose::UInt(u) => u.to_string(),
            Loose::Float(f) => f.to_string(),
            Loose::Other(what) => (*what).to_string(),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LooseVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for LooseVisitor<'a> {
            type Value = Loose<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Loose<'a>, E> {
                Ok(Loose::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose<'a>, E> {
                Ok(Loose::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Loose<'a>, E> {
                Ok(Loose::Str(Cow::Owned(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose<'a>, E> {
                Ok(Loose::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose<'a>, E> {
                Ok(Loose::UInt(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Loose<'a>, E> {
                Ok(Loose::Float(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose<'a>, E> {
                Ok(Loose::Other("a boolean"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Loose<'a>, E> {
                Ok(Loose::Other("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose<'a>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose<'a>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an object"))
            }
        }

        d.deserialize_any(LooseVisitor(PhantomData))
    }
}

/// Decodes the wire JSON of either record kind (see [`InputRecord::from_json`]).
fn record_from_json(bytes: &[u8], keep_fields: bool) -> Result<InputRecord, JsonError> {
    // A derived struct would also accept a JSON array positionally; only objects are records.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        serde_json::from_slice::<IgnoredAny>(bytes)?;
        return Err(JsonError::NotObject);
    }
    let wire: Wire<'_> = serde_json::from_slice(bytes)?;
    if wire.is_epa() {
        epa_from_wire(wire, keep_fields)
    } else {
        generic_from_wire(wire)
    }
}

fn epa_from_wire(wire: Wire<'_>, keep_fields: bool) -> Result<InputRecord, JsonError> {
    const REQUIRED: [&str; 8] = [
        "stateCode",
        "countyCode",
        "siteNum",
        "parameterCode",
        "poc",
        "dateGMT",
        "timeGMT",
        "sampleMeasurement",
    ];
    if !keep_fields {
        // Only the eight defining columns are looked at, in place; the rest are not copied.
        fn get<'w>(v: &'w Option<Loose<'_>>, name: &'static str) -> Result<&'w str, JsonError> {
            match v {
                None => Err(JsonError::Missing(name)),
                Some(Loose::Str(s)) => Ok(s),
                Some(other) => Err(JsonError::Bad {
                    field: name,
                    reason: format!("expected a string, found {}", other.describe()),
                }),
            }
        }
        let key = [
            get(&wire.state_code, "stateCode")?,
            get(&wire.county_code, "countyCode")?,
            get(&wire.site_num, "siteNum")?,
            get(&wire.parameter_code, "parameterCode")?,
            get(&wire.poc, "poc")?,
        ];
        let (device_id, timestamp, value) = epa_core(
            key,
            get(&wire.date_gmt, "dateGMT")?,
            get(&wire.time_gmt, "timeGMT")?,
            get(&wire.sample_measurement, "sampleMeasurement")?,
        )?;
        return Ok(InputRecord {
            device_id,
            timestamp,
            value,
            fields: None,
        });
    }
    let mut err = None;
    let mut columns = wire.epa_columns().into_iter();
    let fields = EpaFields::from_fn(|name| match columns.next().flatten() {
        Some(Loose::Str(s)) => s.into_owned(),
        None => {
            if REQUIRED.contains(&name) {
                err.get_or_insert(JsonError::Missing(name));
            }
            String::new()
        }
        Some(other) => {
            err.get_or_insert(JsonError::Bad {
                field: name,
                reason: format!("expected a string, found {}", other.describe()),
            });
            String::new()
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    Ok(epa_record(fields)?)
}

fn generic_from_wire(wire: Wire<'_>) -> Result<InputRecord, JsonError> {
    let bad = |field, reason: String| JsonError::Bad { field, reason };
    let epoch = |n: i64, ms: bool, shown: &dyn fmt::Display| {
        let ts = epoch_number(n, ms);
        match DateTime::from_timestamp(ts, 0) {
            Some(_) => Ok(ts),
            None => Err(bad(
                "timestamp",
                format!("epoch value {shown} is out of range"),
            )),
        }
    };
    let timestamp = match wire.timestamp {
        None => return Err(JsonError::Missing("timestamp")),
        Some(Loose::Str(s)) => parse_timestamp(&s).map_err(|r| bad("timestamp", r))?,
        Some(Loose::Int(i)) => epoch(i, i.unsigned_abs() >= 1_000_000_000_000, &i)?,
        Some(Loose::UInt(u)) => match i64::try_from(u) {
            Ok(i) => epoch(i, i >= 1_000_000_000_000, &u)?,
            Err(_) => return Err(bad("timestamp", format!("epoch value {u} is out of range"))),
        },
        Some(Loose::Float(f)) if f.is_finite() && f.abs() < 9.0e15 => {
            epoch(f.floor() as i64, f.abs() >= 1e12, &f)?
        }
        Some(other) => {
            return Err(bad(
                "timestamp",
                format!(
                    "expected a string or epoch number, found {}",
                    other.describe()
                ),
            ))
        }
    };
    let device_id = match wire.device_id {
        None => return Err(JsonError::Missing("deviceId")),
        Some(Loose::Str(s)) if s.trim().is_empty() => return Err(bad("deviceId", "empty".into())),
        Some(Loose::Str(s)) => s.into_owned(),
        Some(other) => {
            return Err(bad(
                "deviceId",
                format!("expected a string, found {}", other.describe()),
            ))
        }
    };
    let value = match wire.value {
        None => return Err(JsonError::Missing("value")),
        Some(Loose::Int(i)) => i as f64,
        Some(Loose::UInt(u)) => u as f64,
        Some(Loose::Float(f)) => f,
        Some(Loose::Str(s)) => parse_value(&s, "value")?,
        Some(other) => {
            return Err(bad(
                "value",
                format!("expected a number, found {}", other.describe()),
            ))
        }
    };
    Ok(InputRecord {
        device_id,
        timestamp,
        value,
        fields: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPA_HEADER: &str = "stateCode,countyCode,siteNum,parameterCode,poc,latitude,longitude,datum,parameterName,dateLocal,timeLocal,dateGMT,timeGMT,sampleMeasurement,unitsOfMeasure,mdl,uncertainty,qualifier,methodType,methodCode,methodName,stateName,countyName,dateOfLastChange";
    const EPA_ROW: &str = "10,001,0002,44201,1,38.986672,-75.5568,WGS84,Ozone,2014-01-01,00:00,2014-01-01,05:00,0.016,Parts per million,0.005,,,FEM,047,INSTRUMENTAL - ULTRA VIOLET,Delaware,Kent,2014-02-12";
    /// 2014-01-01T05:00:00Z
    const T0: i64 = 1_388_552_400;

    fn read_all(
        text: &str,
        format: Option<Format>,
        stem: &str,
    ) -> (Format, Vec<Result<InputRecord, RowError>>) {
        let r = RecordReader::new(text.as_bytes(), format, stem).expect("header");
        let f = r.format();
        (f, r.collect())
    }

    #[test]
    fn epa_example_row_parses() {
        let (format, rows) = read_all(&format!("{EPA_HEADER}\n{EPA_ROW}\n"), None, "x");
        assert_eq!(format, Format::Epa);
        assert_eq!(rows.len(), 1);
        let rec = rows[0].as_ref().expect("good row");
        assert_eq!(rec.device_id, "10-001-0002-44201-1");
        assert_eq!(rec.timestamp, T0);
        assert_eq!(rfc3339(rec.timestamp), "2014-01-01T05:00:00Z");
        assert_eq!(rec.value, 0.016);
        let f = rec.fields.as_ref().expect("EPA fields kept");
        assert_eq!(f.method_name, "INSTRUMENTAL - ULTRA VIOLET");
        assert_eq!(f.uncertainty, "");
        assert_eq!(f.date_of_last_change, "2014-02-12");
        assert_eq!(f.values().join(","), EPA_ROW);
    }

    #[test]
    fn real_epa_download_header_is_detected() {
        let header = "\u{feff}\"State Code\",\"County Code\",\"Site Num\",\"Parameter Code\",\"POC\",\"Latitude\",\"Longitude\",\"Datum\",\"Parameter Name\",\"Date Local\",\"Time Local\",\"Date GMT\",\"Time GMT\",\"Sample Measurement\",\"Units of Measure\",\"MDL\",\"Uncertainty\",\"Qualifier\",\"Method Type\",\"Method Code\",\"Method Name\",\"State Name\",\"County Name\",\"Date of Last Change\"";
        let row = "\"01\",\"003\",\"0010\",\"44201\",1,30.497478,-87.880258,\"NAD83\",\"Ozone\",\"2014-03-01\",\"01:00\",\"2014-03-01\",\"07:00\",0.034,\"Parts per million\",0.005,\"\",\"\",\"FEM\",\"087\",\"INSTRUMENTAL - ULTRA VIOLET ABSORPTION\",\"Alabama\",\"Baldwin\",\"2014-06-30\"";
        let (format, rows) = read_all(&format!("{header}\n{row}\n"), None, "x");
        assert_eq!(format, Format::Epa);
        let rec = rows[0].as_ref().expect("good row");
        assert_eq!(rec.device_id, "01-003-0010-44201-1");
        assert_eq!(rfc3339(rec.timestamp), "2014-03-01T07:00:00Z");
        assert_eq!(rec.value, 0.034);
    }

    #[test]
    fn generic_format_accepts_all_timestamp_forms() {
        let text = "timestamp,device_id,value\n\
            2014-01-01T05:00:00Z,dev-a,1.5\n\
            2014-01-01T06:00:00+01:00,dev-a,2\n\
            2014-01-01 05:00:00,dev-b,-3.25\n\
            2014-01-01T05:00:00.750,dev-b,0\n\
            1388552400,dev-c,7\n\
            1388552400999,dev-c,8\n\
            2014-01-01T00:00-05:00,dev-d,9\n\
            2014-01-01T10:30:00+0530,dev-d,10\n";
        let (format, rows) = read_all(text, None, "x");
        assert_eq!(format, Format::Generic);
        let recs: Vec<InputRecord> = rows.into_iter().map(|r| r.expect("good row")).collect();
        assert_eq!(recs.len(), 8);
        for rec in &recs {
            assert_eq!(rec.timestamp, T0, "{rec:?}");
            assert!(rec.fields.is_none());
        }
        let devices: Vec<&str> = recs.iter().map(|r| r.key()).collect();
        assert_eq!(
            devices,
            ["dev-a", "dev-a", "dev-b", "dev-b", "dev-c", "dev-c", "dev-d", "dev-d"]
        );
        assert_eq!(recs[2].value, -3.25);
    }

    #[test]
    fn generic_columns_are_found_by_name_in_any_order() {
        let text = "value,timestamp,deviceId\n4.5,2014-01-01 05:00:00,m1\n";
        let (format, rows) = read_all(text, None, "x");
        assert_eq!(format, Format::Generic);
        let rec = rows[0].as_ref().expect("good row");
        assert_eq!((rec.key(), rec.timestamp, rec.value), ("m1", T0, 4.5));
    }

    #[test]
    fn nab_format_uses_file_stem_as_device() {
        let dir = std::env::temp_dir().join(format!("gen-nab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("machine_temperature_system_failure.csv");
        std::fs::write(
            &path,
            "timestamp,value\n2013-12-02 21:15:00,73.96732207\n2013-12-02 21:20:00,74.935882\n",
        )
        .expect("write");
        let reader = RecordReader::from_path(&path, None).expect("open");
        assert_eq!(reader.format(), Format::Nab);
        let recs: Vec<InputRecord> = reader.map(|r| r.expect("good row")).collect();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].device_id, "machine_temperature_system_failure");
        assert_eq!(rfc3339(recs[1].timestamp), "2013-12-02T21:20:00Z");
        assert_eq!(recs[0].value, 73.96732207);
    }

    #[test]
    fn bad_rows_carry_line_numbers_and_reasons() {
        let text = format!(
            "{EPA_HEADER}\n{EPA_ROW}\n\
             10,001,0002,44201,1,38.98\n\
             {}\n\
             {}\n\
             {}\n\
             {}\n\
             {EPA_ROW}\n",
            EPA_ROW.replace(",0.016,", ",abc,"),
            EPA_ROW.replace(",0.016,", ",,"),
            EPA_ROW.replace("2014-01-01,05:00", "2014-13-01,05:00"),
            EPA_ROW.replace(",0.016,", ",NaN,"),
        );
        let (_, rows) = read_all(&text, None, "x");
        assert_eq!(rows.len(), 7, "every row is reported, none dropped");
        assert!(rows[0].is_ok() && rows[6].is_ok());
        let errs: Vec<&RowError> = rows[1..6]
            .iter()
            .map(|r| r.as_ref().expect_err("bad row"))
            .collect();
        assert_eq!(
            errs.iter().map(|e| e.line).collect::<Vec<_>>(),
            [3, 4, 5, 6, 7]
        );
        assert!(
            errs[0]
                .reason
                .starts_with("expected 24 columns, found 6 (missing `longitude`"),
            "{}",
            errs[0].reason
        );
        assert_eq!(errs[1].reason, "sampleMeasurement: not a number: `abc`");
        assert_eq!(errs[2].reason, "sampleMeasurement: missing value");
        assert!(
            errs[3].reason.starts_with("dateGMT: bad date `2014-13-01`"),
            "{}",
            errs[3].reason
        );
        assert!(
            errs[4].reason.contains("not a finite number"),
            "{}",
            errs[4].reason
        );
        assert_eq!(rows[6].as_ref().map(|r| r.timestamp), Ok(T0));
        assert_eq!(
            errs[1].to_string(),
            "line 4: sampleMeasurement: not a number: `abc`"
        );
    }

    #[test]
    fn generic_bad_rows_are_reported() {
        let text = "timestamp,device_id,value\n\
                    2014-01-01T05:00:00Z,a,1\n\
                    2014-01-01T05:00:00Z,a\n\
                    \n\
                    yesterday,a,1\n\
                    2014-01-01T05:00:00Z,,1\n\
                    2014-01-01T05:00:00Z,a,1.2.3\n\
                    2014-01-01T25:00:00Z,a,1\n\
                    \"2014-01-01T05:00:00Z\",\"a\",\"2\"\n";
        let (_, rows) = read_all(text, None, "x");
        let summary: Vec<(u64, String)> = rows
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| (e.line, e.reason.clone())))
            .collect();
        assert_eq!(summary.len(), 5, "{summary:?}");
        assert_eq!(
            summary[0],
            (
                3,
                "expected 3 columns, found 2 (missing `value`)".to_string()
            )
        );
        // Line 4 is blank and skipped; numbering still counts it.
        assert_eq!(summary[1].0, 5);
        assert!(
            summary[1]
                .1
                .starts_with("timestamp: bad timestamp `yesterday`"),
            "{}",
            summary[1].1
        );
        assert_eq!(summary[2], (6, "device_id: empty".to_string()));
        assert_eq!(summary[3], (7, "value: not a number: `1.2.3`".to_string()));
        assert_eq!(summary[4].0, 8);
        let good: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|r| r.value))
            .collect();
        assert_eq!(good, [1.0, 2.0]);
    }

    #[test]
    fn invalid_utf8_spoils_one_row_only() {
        let mut bytes = b"timestamp,device_id,value\n2014-01-01T05:00:00Z,a,1\n".to_vec();
        bytes.extend_from_slice(b"2014-01-01T05:00:00Z,\xff\xfe,1\n2014-01-01T06:00:00Z,a,2\n");
        let reader = RecordReader::new(&bytes[..], None, "x").expect("header");
        let rows: Vec<_> = reader.collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].as_ref().expect_err("bad utf8").line, 3);
        assert_eq!(rows[2].as_ref().map(|r| r.value), Ok(2.0));
    }

    #[test]
    fn header_detection_and_override() {
        assert!(matches!(
            RecordReader::new(&b"a,b,c\n1,2,3\n"[..], None, "x").err(),
            Some(OpenError::UnknownHeader(h)) if h == "a,b,c"
        ));
        assert!(matches!(
            RecordReader::new(&b""[..], None, "x").err(),
            Some(OpenError::Empty)
        ));
        // Forcing generic on an unnamed header uses the documented column order.
        let (format, rows) = read_all("t,d,v\n1388552400,z,3\n", Some(Format::Generic), "x");
        assert_eq!(format, Format::Generic);
        assert_eq!(
            rows[0].as_ref().map(|r| (r.key().to_string(), r.timestamp)),
            Ok(("z".into(), T0))
        );
        // Forcing NAB on a generic file ignores the device column and uses the stem.
        let (format, rows) = read_all(
            "timestamp,device_id,value\n1388552400,z,3\n",
            Some(Format::Nab),
            "stem",
        );
        assert_eq!(format, Format::Nab);
        assert_eq!(
            rows[0].as_ref().map(|r| r.key().to_string()),
            Ok("stem".into())
        );
        assert!(matches!(
            RecordReader::new(&b"timestamp,device_id\n"[..], Some(Format::Generic), "x").err(),
            Some(OpenError::MissingColumn {
                column: "value",
                ..
            })
        ));
    }

    #[test]
    fn epa_json_round_trip_keeps_the_24_original_names() {
        let (_, rows) = read_all(&format!("{EPA_HEADER}\n{EPA_ROW}\n"), None, "x");
        let rec = rows.into_iter().next().expect("row").expect("good");
        let json = rec.to_json();
        let obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&json).expect("valid JSON");
        let names: Vec<&str> = obj.keys().map(String::as_str).collect();
        let mut expected = EPA_COLUMNS.to_vec();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        expected.sort_unstable();
        assert_eq!(sorted, expected, "exactly the 24 original fields");
        assert!(
            json.starts_with(r#"{"stateCode":"10","countyCode":"001","siteNum":"0002""#),
            "{json}"
        );
        assert!(json
            .contains(r#""dateGMT":"2014-01-01","timeGMT":"05:00","sampleMeasurement":"0.016""#));
        let back = InputRecord::from_json(json.as_bytes()).expect("parses back");
        assert_eq!(back, rec);
    }

    #[test]
    fn generic_json_round_trip() {
        let rec = InputRecord {
            device_id: "pump-7".into(),
            timestamp: T0,
            value: -0.125,
            fields: None,
        };
        let json = rec.to_json();
        assert_eq!(
            json,
            r#"{"timestamp":"2014-01-01T05:00:00Z","deviceId":"pump-7","value":-0.125}"#
        );
        assert_eq!(
            InputRecord::from_json(json.as_bytes()).expect("parses"),
            rec
        );
        // Epoch numbers (seconds or milliseconds) and numeric strings are accepted too.
        let alt = InputRecord::from_json(
            br#"{"timestamp":1388552400123,"deviceId":"pump-7","value":"-0.125"}"#,
        )
        .expect("parses");
        assert_eq!(alt, rec);
    }

    #[test]
    fn json_errors_name_the_field() {
        let cases: [(&[u8], &str); 9] = [
            (br#"{"deviceId":"a","value":1}"#, "missing field `timestamp`"),
            (br#"{"timestamp":"2014-01-01T05:00:00Z","value":1}"#, "missing field `deviceId`"),
            (br#"{"timestamp":"2014-01-01T05:00:00Z","deviceId":"a"}"#, "missing field `value`"),
            (br#"{"timestamp":"2014-01-01T05:00:00Z","deviceId":"a","value":"x"}"#, "bad field `value`: not a number: `x`"),
            (br#"{"timestamp":"soon","deviceId":"a","value":1}"#, "bad field `timestamp`: bad timestamp `soon`"),
            (br#"{"timestamp":"2014-01-01T05:00:00Z","deviceId":7,"value":1}"#, "bad field `deviceId`: expected a string"),
            (br#"{"stateCode":"10","countyCode":"001","siteNum":"0002","parameterCode":"44201","poc":"1","dateGMT":"2014-01-01","timeGMT":"05:00"}"#, "missing field `sampleMeasurement`"),
            (br#"{"stateCode":"10","countyCode":"001","siteNum":"0002","parameterCode":"44201","poc":"1","dateGMT":"2014-01-01","timeGMT":"5h","sampleMeasurement":"1"}"#, "bad field `timeGMT`: bad time `5h`"),
            (b"[1,2]", "JSON record is not an object"),
        ];
        for (json, want) in cases {
            let err = InputRecord::from_json(json)
                .expect_err("must fail")
                .to_string();
            assert!(
                err.starts_with(want),
                "{} -> {err}",
                String::from_utf8_lossy(json)
            );
        }
        assert!(matches!(
            InputRecord::from_json(b"{nope"),
            Err(JsonError::Malformed(_))
        ));
    }

    #[test]
    fn reading_from_json_drops_epa_columns_but_validates_the_same() {
        let (_, rows) = read_all(&format!("{EPA_HEADER}\n{EPA_ROW}\n"), None, "x");
        let rec = rows.into_iter().next().expect("row").expect("good");
        let json = rec.to_json();
        let lean = InputRecord::reading_from_json(json.as_bytes()).expect("parses");
        assert_eq!(
            (
                lean.device_id.as_str(),
                lean.timestamp,
                lean.value,
                lean.fields.is_none()
            ),
            ("10-001-0002-44201-1", T0, 0.016, true)
        );
        let broken = json.replace(r#""timeGMT":"05:00""#, r#""timeGMT":5"#);
        for parse in [InputRecord::from_json, InputRecord::reading_from_json] {
            let err = parse(broken.as_bytes())
                .expect_err("bad timeGMT")
                .to_string();
            assert_eq!(err, "bad field `timeGMT`: expected a string, found 5");
            let err = parse(json.replace(r#""poc":"1","#, "").as_bytes()).expect_err("no poc");
            assert_eq!(err.to_string(), "missing field `poc`");
        }
        let generic = br#"{"timestamp":"2014-01-01T05:00:00Z","deviceId":"a","value":2}"#;
        assert_eq!(
            InputRecord::reading_from_json(generic).expect("parses"),
            InputRecord::from_json(generic).expect("parses")
        );
    }

    #[test]
    fn json_reader_handles_escapes_nulls_and_unknown_fields() {
        // Escaped strings (owned path), an unknown nested field and null optional EPA columns.
        let json = br#"{"extra":{"a":[1,2,{"b":null}]},"stateCode":"10","countyCode":"001","siteNum":"0002","parameterCode":"44201","poc":"1","dateGMT":"2014-01-01","timeGMT":"05:00","sampleMeasurement":"0.016","methodName":"UV \"photometric\"\u00e9","qualifier":null}"#;
        let rec = InputRecord::from_json(json).expect("parses");
        let f = rec.fields.as_ref().expect("fields");
        assert_eq!(f.method_name, "UV \"photometric\"\u{e9}");
        assert_eq!((f.qualifier.as_str(), f.county_name.as_str()), ("", ""));
        assert_eq!(rec.device_id, "10-001-0002-44201-1");
        let nested = br#"{"timestamp":"2014-01-01T05:00:00Z","deviceId":{"id":1},"value":1}"#;
        let err = InputRecord::from_json(nested)
            .expect_err("object id")
            .to_string();
        assert_eq!(
            err,
            "bad field `deviceId`: expected a string, found an object"
        );
        let esc = br#"{"timestamp":"2014-01-01T05:00:00Z","deviceId":"a\/b","value":1.5e0}"#;
        assert_eq!(
            InputRecord::from_json(esc).expect("parses").device_id,
            "a/b"
        );
        assert!(matches!(
            InputRecord::from_json(b" [1]"),
            Err(JsonError::NotObject)
        ));
        assert!(matches!(
            InputRecord::from_json(b"[1"),
            Err(JsonError::Malformed(_))
        ));
        assert!(matches!(
            InputRecord::from_json(b"{\"value\":1,}"),
            Err(JsonError::Malformed(_))
        ));
    }

    #[test]
    fn timestamp_parser_edge_cases() {
        assert_eq!(parse_timestamp("2014-01-01"), Ok(T0 - 5 * 3600));
        assert_eq!(parse_timestamp(" 2014-01-01t05:00z "), Ok(T0));
        assert_eq!(parse_timestamp("-3600"), Ok(-3600));
        assert_eq!(parse_timestamp("2014-01-01T05:00:00,5Z"), Ok(T0));
        assert!(parse_timestamp("2014-01-01T05:00:00.Z").is_err());
        assert!(parse_timestamp("2014-02-30T05:00:00Z").is_err());
        assert!(parse_timestamp("2014-01-01T05:00:00+2400").is_err());
        assert!(parse_timestamp("2014-01-01T05:00:00Zjunk").is_err());
        assert!(parse_timestamp("99999999999999999")
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(parse_timestamp(""), Err("missing value".to_string()));
    }
}
