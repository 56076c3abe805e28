//! The report: tables of rows, printed as Markdown.

use std::fmt::Write;

use crate::stats::{fmt_duration, Summary};

/// Smallest sample for which a p99 is printed (below it, p99 is just the maximum).
const P99_MIN_SAMPLE: usize = 50;

/// One measured quantity.
#[derive(Debug, Clone)]
pub struct Row {
    what: String,
    n: String,
    median: String,
    p99: String,
    range: String,
    notes: String,
}

impl Row {
    /// A timing: median, p99 (when the sample is large enough) and range.
    pub fn timing(what: impl Into<String>, s: &Summary, notes: impl Into<String>) -> Self {
        Row {
            what: what.into(),
            n: s.n.to_string(),
            median: fmt_duration(s.median),
            p99: if s.n >= P99_MIN_SAMPLE {
                fmt_duration(s.p99)
            } else {
                "—".into()
            },
            range: format!("{} – {}", fmt_duration(s.min), fmt_duration(s.max)),
            notes: notes.into(),
        }
    }

    /// A single value (a size, a rate).
    pub fn value(
        what: impl Into<String>,
        n: usize,
        value: impl Into<String>,
        notes: impl Into<String>,
    ) -> Self {
        Row {
            what: what.into(),
            n: n.to_string(),
            median: value.into(),
            p99: "—".into(),
            range: "—".into(),
            notes: notes.into(),
        }
    }
}

/// A titled table.
#[derive(Debug, Clone)]
pub struct Table {
    /// Heading.
    pub title: String,
    /// Rows in order.
    pub rows: Vec<Row>,
}

impl Table {
    /// An empty table.
    pub fn new(title: impl Into<String>) -> Self {
        Table {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// Markdown (a `###` heading and a pipe table).
    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        out.push_str("| measurement | n | median (or value) | p99 | min – max | notes |\n");
        out.push_str("|---|---:|---:|---:|---:|---|\n");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                cell(&r.what),
                r.n,
                r.median,
                r.p99,
                r.range,
                cell(&r.notes)
            );
        }
        out
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::summarize;
    use std::time::Duration;

    #[test]
    fn tables_render_as_markdown_and_hide_p99_of_small_samples() {
        let mut t = Table::new("Pool");
        let small = summarize(vec![Duration::from_millis(3); 10]);
        let big = summarize(vec![Duration::from_micros(2); 100]);
        t.push(Row::timing("small | sample", &small, "n"));
        t.push(Row::timing("big", &big, ""));
        t.push(Row::value("rss", 1, "12.0 MiB", ""));
        let md = t.markdown();
        assert!(md.starts_with("### Pool\n\n| measurement |"), "{md}");
        assert!(
            md.contains("| small \\| sample | 10 | 3.0 ms | — | 3.0 ms – 3.0 ms | n |"),
            "{md}"
        );
        assert!(md.contains("| big | 100 | 2.00 µs | 2.00 µs |"), "{md}");
        assert!(md.contains("| rss | 1 | 12.0 MiB | — | — |  |"), "{md}");
    }
}
