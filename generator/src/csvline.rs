//! Minimal RFC 4180 record reader that knows the physical line each record starts on.
//!
//! The `csv` crate's record positions point at the end of the previous record, so blank lines and
//! CRLF endings make its line numbers wrong; bad-row reports must name the real line, hence this.

use std::io::{self, BufRead};

/// Longest quoted field, in lines, before the record is declared broken (a stray quote must not
/// swallow the rest of the file).
const MAX_RECORD_LINES: u64 = 1000;

/// Outcome of reading one record.
#[derive(Debug)]
pub(crate) enum Next {
    /// A record starting on this 1-based line; fields via [`CsvLines::field`].
    Record(u64),
    /// A record starting on this line that cannot be split (bad UTF-8, unterminated quote).
    Bad(u64, String),
    /// End of input.
    Eof,
}

/// Streaming splitter; reuses its buffers across records.
pub(crate) struct CsvLines<R> {
    inner: R,
    line: u64,
    raw: Vec<u8>,
    text: String,
    bounds: Vec<(usize, usize)>,
}

impl<R: BufRead> CsvLines<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            line: 0,
            raw: Vec::with_capacity(512),
            text: String::with_capacity(512),
            bounds: Vec::with_capacity(32),
        }
    }

    /// Lines consumed so far.
    pub(crate) fn line(&self) -> u64 {
        self.line
    }

    /// Number of fields of the current record.
    pub(crate) fn len(&self) -> usize {
        self.bounds.len()
    }

    /// Field `i` of the current record (unquoted, `""` unescaped); empty if out of range.
    pub(crate) fn field(&self, i: usize) -> &str {
        self.bounds.get(i).map_or("", |&(a, b)| &self.text[a..b])
    }

    /// Fields of the current record.
    pub(crate) fn fields(&self) -> impl Iterator<Item = &str> {
        self.bounds.iter().map(|&(a, b)| &self.text[a..b])
    }

    /// Reads the next non-blank record.
    pub(crate) fn next_record(&mut self) -> io::Result<Next> {
        self.raw.clear();
        loop {
            if self.inner.read_until(b'\n', &mut self.raw)? == 0 {
                return Ok(Next::Eof);
            }
            self.line += 1;
            if self.line == 1 && self.raw.starts_with(b"\xef\xbb\xbf") {
                self.raw.drain(..3);
            }
            if self.raw.iter().all(u8::is_ascii_whitespace) {
                self.raw.clear();
                continue;
            }
            break;
        }
        let start = self.line;
        loop {
            let Ok(s) = std::str::from_utf8(&self.raw) else {
                // Finish the physical line so the next record starts cleanly.
                return Ok(Next::Bad(start, "row is not valid UTF-8".into()));
            };
            if split(s, &mut self.text, &mut self.bounds) {
                return Ok(Next::Record(start));
            }
            // A quoted field spans the line break: append the next line and split again.
            if self.line - start >= MAX_RECORD_LINES
                || self.inner.read_until(b'\n', &mut self.raw)? == 0
            {
                self.bounds.clear();
                return Ok(Next::Bad(start, "unterminated quoted field".into()));
            }
            self.line += 1;
        }
    }
}

/// Splits one record into `text` + `bounds`; false if a quoted field is still open at the end.
fn split(record: &str, text: &mut String, bounds: &mut Vec<(usize, usize)>) -> bool {
    text.clear();
    bounds.clear();
    let s = record.strip_suffix('\n').unwrap_or(record);
    let s = s.strip_suffix('\r').unwrap_or(s);
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        let start = text.len();
        if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                let Some(j) = s[i..].find('"').map(|j| i + j) else {
                    return false;
                };
                text.push_str(&s[i..j]);
                if b.get(j + 1) == Some(&b'"') {
                    text.push('"');
                    i = j + 2;
                } else {
                    i = j + 1;
                    break;
                }
            }
        }
        // Unquoted field, or anything after a closing quote (kept literally, as the csv crate does).
        let end = s[i..].find(',').map_or(s.len(), |j| i + j);
        text.push_str(&s[i..end]);
        i = end;
        bounds.push((start, text.len()));
        if i >= b.len() {
            return true;
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &[u8]) -> Vec<(u64, Vec<String>)> {
        let mut r = CsvLines::new(text);
        let mut out = Vec::new();
        loop {
            match r.next_record().expect("in-memory read") {
                Next::Record(line) => out.push((line, r.fields().map(str::to_string).collect())),
                Next::Bad(line, why) => out.push((line, vec![format!("BAD {why}")])),
                Next::Eof => return out,
            }
        }
    }

    fn row(line: u64, fields: &[&str]) -> (u64, Vec<String>) {
        (line, fields.iter().map(|f| f.to_string()).collect())
    }

    #[test]
    fn line_numbers_survive_blank_lines_crlf_and_multiline_fields() {
        let got = all(b"h,i\r\na,1\r\n\r\nb,2\r\n\"x\ny\",3\nc,\"q\"\"d\"\n\n  \nlast,");
        assert_eq!(
            got,
            [
                row(1, &["h", "i"]),
                row(2, &["a", "1"]),
                row(4, &["b", "2"]),
                row(5, &["x\ny", "3"]),
                row(7, &["c", "q\"d"]),
                row(10, &["last", ""]),
            ]
        );
    }

    #[test]
    fn bom_bad_utf8_and_unterminated_quotes() {
        let got = all(b"\xef\xbb\xbfh\nok\nbad\xff\nnext\n\"open,1\n");
        assert_eq!(
            got,
            [
                row(1, &["h"]),
                row(2, &["ok"]),
                row(3, &["BAD row is not valid UTF-8"]),
                row(4, &["next"]),
                row(5, &["BAD unterminated quoted field"]),
            ]
        );
        assert_eq!(all(b"a,,\"\"\n"), [row(1, &["a", "", ""])]);
    }
}
