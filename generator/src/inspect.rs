//! Summary of an input file: format, row counts, bad rows, per-device spans and Kafka partitions.

use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead;
use std::num::NonZeroU32;

use crate::partitioner::partition_for_key;
use crate::records::{rfc3339, Format, RecordReader, RowError};

/// How many bad rows are kept for display (all are counted).
pub const SHOWN_BAD_ROWS: usize = 20;

/// Per-device statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSummary {
    /// Device id (Kafka key).
    pub device_id: String,
    /// Good rows.
    pub rows: u64,
    /// Earliest timestamp (epoch seconds).
    pub first: i64,
    /// Latest timestamp (epoch seconds).
    pub last: i64,
    /// Rows whose timestamp is not after the device's previous row (a streaming detector sees
    /// these out of order or duplicated).
    pub out_of_order: u64,
    /// Partition the Java client's default partitioner assigns to this key.
    pub partition: u32,
}

/// Summary of one file.
#[derive(Clone, Debug, PartialEq)]
pub struct Inspection {
    /// Format used.
    pub format: Format,
    /// Partition count the assignment was computed for.
    pub partitions: u32,
    /// Good rows.
    pub rows: u64,
    /// Bad rows (all counted).
    pub bad_rows: u64,
    /// The first [`SHOWN_BAD_ROWS`] bad rows.
    pub first_bad: Vec<RowError>,
    /// Devices sorted by id.
    pub devices: Vec<DeviceSummary>,
}

/// Streams every row of `reader` into a summary.
pub fn inspect<R: BufRead>(reader: RecordReader<R>, partitions: NonZeroU32) -> Inspection {
    let format = reader.format();
    let mut devices: BTreeMap<String, DeviceSummary> = BTreeMap::new();
    let (mut rows, mut bad_rows) = (0u64, 0u64);
    let mut first_bad = Vec::new();
    // Remembers each device's previous timestamp to count order violations.
    let mut previous: BTreeMap<String, i64> = BTreeMap::new();
    for row in reader {
        match row {
            Ok(rec) => {
                rows += 1;
                let entry = devices
                    .entry(rec.device_id.clone())
                    .or_insert_with(|| DeviceSummary {
                        partition: partition_for_key(rec.device_id.as_bytes(), partitions),
                        device_id: rec.device_id.clone(),
                        rows: 0,
                        first: rec.timestamp,
                        last: rec.timestamp,
                        out_of_order: 0,
                    });
                entry.rows += 1;
                entry.first = entry.first.min(rec.timestamp);
                entry.last = entry.last.max(rec.timestamp);
                if let Some(prev) = previous.insert(rec.device_id, rec.timestamp) {
                    if rec.timestamp <= prev {
                        entry.out_of_order += 1;
                    }
                }
            }
            Err(e) => {
                bad_rows += 1;
                if first_bad.len() < SHOWN_BAD_ROWS {
                    first_bad.push(e);
                }
            }
        }
    }
    Inspection {
        format,
        partitions: partitions.get(),
        rows,
        bad_rows,
        first_bad,
        devices: devices.into_values().collect(),
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "format:   {}", self.format)?;
        writeln!(f, "rows:     {} good, {} bad", self.rows, self.bad_rows)?;
        writeln!(f, "devices:  {}", self.devices.len())?;
        if !self.first_bad.is_empty() {
            let shown = self.first_bad.len() as u64;
            if shown < self.bad_rows {
                writeln!(f, "bad rows (first {shown} of {}):", self.bad_rows)?;
            } else {
                writeln!(f, "bad rows:")?;
            }
            for e in &self.first_bad {
                writeln!(f, "  line {}: {}", e.line, e.reason)?;
            }
        }
        let width = self
            .devices
            .iter()
            .map(|d| d.device_id.len())
            .max()
            .unwrap_or(6)
            .max(6);
        writeln!(
            f,
            "{:<width$}  {:>9}  {:<20}  {:<20}  {:>12}  {:>9}",
            "device",
            "rows",
            "first",
            "last",
            "out-of-order",
            format!("part/{}", self.partitions),
        )?;
        for d in &self.devices {
            writeln!(
                f,
                "{:<width$}  {:>9}  {:<20}  {:<20}  {:>12}  {:>9}",
                d.device_id,
                d.rows,
                rfc3339(d.first),
                rfc3339(d.last),
                d.out_of_order,
                d.partition,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_devices_bad_rows_and_partitions() {
        let mut text = String::from("timestamp,device_id,value\n");
        text.push_str("2014-01-01T00:00:00Z,foobar,1\n");
        text.push_str("2014-01-01T01:00:00Z,21,2\n");
        text.push_str("2014-01-01T02:00:00Z,foobar,x\n");
        text.push_str("2014-01-01T03:00:00Z,foobar,3\n");
        text.push_str("2014-01-01T02:30:00Z,foobar,4\n");
        for i in 0..25 {
            text.push_str(&format!("bad-{i},21,1\n"));
        }
        let reader = RecordReader::new(text.as_bytes(), None, "x").expect("header");
        let report = inspect(reader, NonZeroU32::new(10).expect("10"));
        assert_eq!(report.format, Format::Generic);
        assert_eq!((report.rows, report.bad_rows), (4, 26));
        assert_eq!(report.first_bad.len(), SHOWN_BAD_ROWS);
        assert_eq!(report.first_bad[0].line, 4);
        assert_eq!(report.first_bad[1].line, 7);
        let ids: Vec<&str> = report
            .devices
            .iter()
            .map(|d| d.device_id.as_str())
            .collect();
        assert_eq!(ids, ["21", "foobar"]);
        let foobar = &report.devices[1];
        assert_eq!((foobar.rows, foobar.out_of_order), (3, 1));
        assert_eq!(rfc3339(foobar.first), "2014-01-01T00:00:00Z");
        assert_eq!(rfc3339(foobar.last), "2014-01-01T03:00:00Z");
        // Java client placements (see partitioner tests): "21" → 0, "foobar" → 6 of 10.
        assert_eq!((report.devices[0].partition, foobar.partition), (0, 6));
        let text = report.to_string();
        assert!(text.contains("bad rows (first 20 of 26):"), "{text}");
        assert!(text.contains("line 4: value: not a number: `x`"), "{text}");
    }
}
