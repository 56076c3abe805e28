//! Order statistics of a sample of durations, and how durations and sizes are printed.

use std::time::Duration;

/// Order statistics (nearest rank) of one measured sample.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Sample size.
    pub n: usize,
    /// 50th percentile.
    pub median: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Smallest.
    pub min: Duration,
    /// Largest.
    pub max: Duration,
}

/// Summarises `xs` (must not be empty).
pub fn summarize(mut xs: Vec<Duration>) -> Summary {
    assert!(!xs.is_empty(), "empty sample");
    xs.sort();
    let n = xs.len();
    let at = |q: f64| xs[(((n as f64) * q).ceil() as usize).clamp(1, n) - 1];
    Summary {
        n,
        median: at(0.5),
        p99: at(0.99),
        min: xs[0],
        max: xs[n - 1],
    }
}

/// A duration with a unit that suits its size: `0.42 µs`, `37.5 ms`, `2.41 s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1e-5 {
        format!("{:.2} µs", s * 1e6)
    } else if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// KiB as MiB with one decimal.
pub fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let xs: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = summarize(xs);
        assert_eq!(s.median, Duration::from_millis(50));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(
            (s.min, s.max),
            (Duration::from_millis(1), Duration::from_millis(100))
        );
        let one = summarize(vec![Duration::from_millis(7)]);
        assert_eq!(
            (one.median, one.p99),
            (Duration::from_millis(7), Duration::from_millis(7))
        );
    }

    #[test]
    fn units_follow_size() {
        assert_eq!(fmt_duration(Duration::from_nanos(420)), "0.42 µs");
        assert_eq!(fmt_duration(Duration::from_micros(37)), "37.0 µs");
        assert_eq!(fmt_duration(Duration::from_micros(37_500)), "37.5 ms");
        assert_eq!(fmt_duration(Duration::from_millis(2410)), "2.41 s");
        assert_eq!(fmt_kib(1536), "1.5 MiB");
    }
}
