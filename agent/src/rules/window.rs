//! Time-of-day windows in the configured time zone.

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;

fn local(now_ms: i64, tz: &TimeZone) -> Option<DateTime> {
    Timestamp::from_millisecond(now_ms)
        .ok()
        .map(|ts| tz.to_datetime(ts))
}

/// Whether `now_ms` lies in [from, to) local time. A window wrapping midnight belongs to the
/// day it opens on, so "fri 22:00-02:00" includes Saturday 01:00. from == to is the whole day.
pub fn in_window(
    now_ms: i64,
    tz: &TimeZone,
    from_min: u16,
    to_min: u16,
    days: Option<&[bool; 7]>,
) -> bool {
    let Some(dt) = local(now_ms, tz) else {
        return false;
    };
    let minute = dt.hour() as u16 * 60 + dt.minute() as u16;
    let today = dt.weekday().to_monday_zero_offset() as usize % 7;
    let (inside, opened_yesterday) = if from_min < to_min {
        (minute >= from_min && minute < to_min, false)
    } else if minute >= from_min {
        (true, false)
    } else {
        (minute < to_min, true)
    };
    let day = if opened_yesterday {
        (today + 6) % 7
    } else {
        today
    };
    inside && days.is_none_or(|set| set[day])
}

/// The first window edge (either bound, any day) strictly after `now_ms`.
pub fn next_edge(now_ms: i64, tz: &TimeZone, from_min: u16, to_min: u16) -> Option<i64> {
    let dt = local(now_ms, tz)?;
    let mut best: Option<i64> = None;
    let mut date = dt.date();
    // Three days cover a DST jump moving an edge past midnight.
    for _ in 0..3 {
        for m in [from_min, to_min] {
            let civil = date.at((m / 60) as i8, (m % 60) as i8, 0, 0);
            if let Ok(ts) = tz.to_ambiguous_timestamp(civil).compatible() {
                let ms = ts.as_millisecond();
                if ms > now_ms && best.is_none_or(|b| ms < b) {
                    best = Some(ms);
                }
            }
        }
        date = date.tomorrow().ok()?;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn plain_and_wrapping_windows() {
        let tz = TimeZone::UTC;
        // 1970-01-01 (Thursday).
        assert!(in_window(9 * H, &tz, 8 * 60, 20 * 60, None));
        assert!(!in_window(20 * H, &tz, 8 * 60, 20 * 60, None));
        assert!(in_window(23 * H, &tz, 22 * 60, 2 * 60, None));
        assert!(in_window(25 * H, &tz, 22 * 60, 2 * 60, None));
        assert!(!in_window(3 * H, &tz, 22 * 60, 2 * 60, None));
        assert!(in_window(5 * H, &tz, 0, 0, None));
        // Thursday only: Friday 01:00 is still Thursday's window, Friday 23:00 is not.
        let thu = [false, false, false, true, false, false, false];
        assert!(in_window(25 * H, &tz, 22 * 60, 2 * 60, Some(&thu)));
        assert!(!in_window(47 * H, &tz, 22 * 60, 2 * 60, Some(&thu)));
        assert_eq!(next_edge(9 * H, &tz, 8 * 60, 20 * 60), Some(20 * H));
        assert_eq!(next_edge(20 * H, &tz, 8 * 60, 20 * 60), Some(32 * H));
    }

    #[test]
    fn fixed_offset_zone() {
        let tz = TimeZone::fixed(jiff::tz::offset(2));
        // 06:00 UTC is 08:00 at UTC+2.
        assert!(in_window(6 * H, &tz, 8 * 60, 9 * 60, None));
        assert!(!in_window(8 * H, &tz, 8 * 60, 9 * 60, None));
    }
}
