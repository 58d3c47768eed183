//! Telemetry charts drawn on the Pi as SVG: a sensor's one-minute rollups merged into at most
//! [`BUCKETS_MAX`] buckets (min, max, count-weighted average), so a day at 1 Hz (86,400
//! readings) is a few hundred points and the browser needs no chart library.

use std::fmt::Write as _;

use crate::store::history::Rollup;

/// The most buckets a chart draws: a day in 5-minute buckets.
pub const BUCKETS_MAX: usize = 288;
const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 160.0;
const PAD: f64 = 4.0;

#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub start_ms: i64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
}

/// `rollups` (one sensor, any order) in `[from_ms, to_ms)` merged into buckets of
/// `(to_ms - from_ms) / buckets` ms; empty buckets are left out (a gap, not a zero).
pub fn downsample(rollups: &[Rollup], from_ms: i64, to_ms: i64, buckets: usize) -> Vec<Bucket> {
    let buckets = buckets.clamp(1, BUCKETS_MAX);
    let span = (to_ms - from_ms).max(1);
    let width = (span / buckets as i64).max(1);
    // (min, max, sum, count) per bucket.
    let mut acc: Vec<Option<(f64, f64, f64, u64)>> = vec![None; buckets];
    for r in rollups {
        if r.minute_ms < from_ms || r.minute_ms >= to_ms || r.count == 0 {
            continue;
        }
        let i = (((r.minute_ms - from_ms) / width) as usize).min(buckets - 1);
        let sum = r.avg * r.count as f64;
        acc[i] = Some(match acc[i] {
            None => (r.min, r.max, sum, r.count),
            Some((lo, hi, s, c)) => (lo.min(r.min), hi.max(r.max), s + sum, c + r.count),
        });
    }
    acc.into_iter()
        .enumerate()
        .filter_map(|(i, a)| {
            a.map(|(min, max, sum, count)| Bucket {
                start_ms: from_ms + i as i64 * width,
                min,
                max,
                avg: sum / count as f64,
            })
        })
        .collect()
}

/// The SVG of `buckets` over `[from_ms, to_ms)`: a band from min to max and a line through the
/// averages, with the value range written at the left. `label` names it for screen readers.
pub fn svg(buckets: &[Bucket], from_ms: i64, to_ms: i64, label: &str) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}" preserveAspectRatio="none">"#,
        escape(label)
    );
    if buckets.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" class="empty">no readings</text></svg>"#,
            WIDTH / 2.0 - 40.0,
            HEIGHT / 2.0
        );
        return out;
    }
    let lo = buckets.iter().map(|b| b.min).fold(f64::INFINITY, f64::min);
    let hi = buckets
        .iter()
        .map(|b| b.max)
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if hi - lo < 1e-9 {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo, hi)
    };
    let span = (to_ms - from_ms).max(1) as f64;
    let x = |t: i64| PAD + (t - from_ms) as f64 / span * (WIDTH - 2.0 * PAD);
    let y = |v: f64| PAD + (hi - v) / (hi - lo) * (HEIGHT - 2.0 * PAD);
    let mut band = String::new();
    for b in buckets {
        let _ = write!(band, "{:.1},{:.1} ", x(b.start_ms), y(b.max));
    }
    for b in buckets.iter().rev() {
        let _ = write!(band, "{:.1},{:.1} ", x(b.start_ms), y(b.min));
    }
    let mut line = String::new();
    for b in buckets {
        let _ = write!(line, "{:.1},{:.1} ", x(b.start_ms), y(b.avg));
    }
    // A lone bucket has no line to draw: a short round-capped stroke shows it as a dot (a
    // circle would be stretched with the chart).
    if buckets.len() == 1 {
        let b = &buckets[0];
        let (cx, cy) = (x(b.start_ms), y(b.avg));
        let _ = write!(
            out,
            r#"<polyline class="dot" points="{:.1},{cy:.1} {:.1},{cy:.1}"/>"#,
            cx - 0.5,
            cx + 0.5
        );
    }
    // The value range is written beside the chart, in HTML ([`range`]): text inside a chart
    // stretched to its box would be stretched too.
    let _ = write!(
        out,
        r#"<polygon class="band" points="{}"/><polyline class="avg" points="{}"/></svg>"#,
        band.trim_end(),
        line.trim_end(),
    );
    out
}

/// The lowest minimum and the highest maximum of `buckets`.
pub fn range(buckets: &[Bucket]) -> Option<(f64, f64)> {
    let lo = buckets.iter().map(|b| b.min).reduce(f64::min)?;
    let hi = buckets.iter().map(|b| b.max).reduce(f64::max)?;
    Some((lo, hi))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(minute_ms: i64, min: f64, max: f64, avg: f64, count: u64) -> Rollup {
        Rollup {
            device_id: "M".into(),
            sensor_key: "ph".into(),
            minute_ms,
            min,
            max,
            avg,
            count,
            last: avg,
            last_at_ms: minute_ms,
            last_received_at_ms: Some(minute_ms),
        }
    }

    #[test]
    fn a_day_at_one_hertz_is_at_most_288_buckets_with_true_extremes_and_weighted_means() {
        let day = 86_400_000;
        let rollups: Vec<Rollup> = (0..1440)
            .map(|m| {
                let v = (m % 60) as f64;
                minute(m * 60_000, v - 1.0, v + 1.0, v, 60)
            })
            .collect();
        let b = downsample(&rollups, 0, day, BUCKETS_MAX);
        assert_eq!(b.len(), 288);
        // Bucket 0 covers minutes 0..5: values 0..4.
        assert_eq!((b[0].min, b[0].max, b[0].avg), (-1.0, 5.0, 2.0));
        assert_eq!(b[1].start_ms, 300_000);
        // Unequal counts weigh the mean.
        let b = downsample(
            &[
                minute(0, 1.0, 1.0, 1.0, 3),
                minute(60_000, 5.0, 5.0, 5.0, 1),
            ],
            0,
            600_000,
            1,
        );
        assert_eq!(b[0].avg, 2.0);
    }

    #[test]
    fn empty_buckets_are_gaps_and_readings_outside_the_window_are_left_out() {
        let b = downsample(
            &[
                minute(-60_000, 9.0, 9.0, 9.0, 1),
                minute(0, 1.0, 1.0, 1.0, 1),
                minute(3_000_000, 2.0, 2.0, 2.0, 1),
                minute(3_600_000, 9.0, 9.0, 9.0, 1),
            ],
            0,
            3_600_000,
            60,
        );
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].start_ms, 3_000_000);
    }

    #[test]
    fn the_svg_draws_band_and_line_with_the_range_and_says_when_empty() {
        let b = downsample(&[minute(0, 6.0, 7.0, 6.5, 60)], 0, 3_600_000, 60);
        let s = svg(&b, 0, 3_600_000, "ph <last hour>");
        assert!(s.contains("<polyline class=\"avg\""), "{s}");
        assert_eq!(range(&b), Some((6.0, 7.0)));
        assert!(s.contains("class=\"dot\""), "a lone bucket is a dot: {s}");
        assert!(s.contains("aria-label=\"ph &lt;last hour&gt;\""), "{s}");
        assert!(svg(&[], 0, 1, "x").contains("no readings"));
    }
}
