//! Cron occurrences computed in a time zone, without a scheduler task.
//!
//! croner parses the expression; its match functions are walked over jiff civil times here
//! because croner's own `find_next_occurrence` wants chrono types, which the agent does not use.

use croner::Cron;
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// Days searched for a next occurrence before giving up (covers leap-day-only patterns).
const SEARCH_DAYS: i32 = 366 * 8 + 2;

/// A parsed cron expression: 5 fields (minute first, second 0) or 6 (second first).
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    text: String,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl CronSchedule {
    pub fn parse(text: &str) -> Result<CronSchedule, String> {
        let cron = Cron::new(text)
            .with_seconds_optional()
            .parse()
            .map_err(|e| e.to_string())?;
        Ok(CronSchedule {
            cron,
            text: text.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first occurrence strictly after `after_ms`, or None if there is none in 8 years.
    pub fn next_after(&self, after_ms: i64, tz: &TimeZone) -> Option<i64> {
        let ts = Timestamp::from_millisecond(after_ms).ok()?;
        let local = tz.to_datetime(ts);
        let start = local
            .with()
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.second())
            .ok()?;
        let mut date = start.date();
        for _ in 0..SEARCH_DAYS {
            if self.day_matches(date) {
                let first = if date == start.date() {
                    Some(start)
                } else {
                    None
                };
                if let Some(ms) = self.in_day(date, first, after_ms, tz) {
                    return Some(ms);
                }
            }
            date = date.tomorrow().ok()?;
        }
        None
    }

    fn day_matches(&self, date: Date) -> bool {
        let p = &self.cron.pattern;
        let (y, m, d) = (
            i32::from(date.year()),
            date.month() as u32,
            date.day() as u32,
        );
        p.month_match(m).unwrap_or(false) && p.day_match(y, m, d).unwrap_or(false)
    }

    /// The first matching second of `date` at or after `from` whose instant is after `after_ms`
    /// (a civil time in a DST fold can map before it; a gap maps forward).
    fn in_day(
        &self,
        date: Date,
        from: Option<DateTime>,
        after_ms: i64,
        tz: &TimeZone,
    ) -> Option<i64> {
        let p = &self.cron.pattern;
        // jiff's civil fields are small non-negative i8s.
        let start = from.map_or(0, |t| {
            t.hour() as u32 * 3600 + t.minute() as u32 * 60 + t.second() as u32
        });
        for hour in (start / 3600)..24 {
            if !p.hour_match(hour).unwrap_or(false) {
                continue;
            }
            for minute in 0..60 {
                if hour * 3600 + minute * 60 + 59 < start
                    || !p.minute_match(minute).unwrap_or(false)
                {
                    continue;
                }
                for second in 0..60 {
                    if hour * 3600 + minute * 60 + second < start
                        || !p.second_match(second).unwrap_or(false)
                    {
                        continue;
                    }
                    let dt = date.at(hour as i8, minute as i8, second as i8, 0);
                    let Ok(ts) = tz.to_ambiguous_timestamp(dt).compatible() else {
                        continue;
                    };
                    let ms = ts.as_millisecond();
                    if ms > after_ms {
                        return Some(ms);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_and_six_field_forms() {
        let tz = TimeZone::UTC;
        let five = CronSchedule::parse("*/5 * * * *").unwrap();
        assert_eq!(five.next_after(0, &tz), Some(300_000));
        assert_eq!(five.next_after(300_000, &tz), Some(600_000));
        let six = CronSchedule::parse("30 */5 * * * *").unwrap();
        assert_eq!(six.next_after(0, &tz), Some(30_000));
        assert_eq!(six.next_after(30_000, &tz), Some(330_000));
        assert!(CronSchedule::parse("61 * * * *").is_err());
        assert!(CronSchedule::parse("nonsense").is_err());
    }

    #[test]
    fn time_zone_and_weekday() {
        // 1970-01-01 was a Thursday; 08:00 at UTC+2 is 06:00 UTC.
        let tz = TimeZone::fixed(jiff::tz::offset(2));
        let daily = CronSchedule::parse("0 8 * * *").unwrap();
        assert_eq!(daily.next_after(0, &tz), Some(6 * 3_600_000));
        let monday = CronSchedule::parse("0 0 * * MON").unwrap();
        // Monday 1970-01-05 00:00 at UTC+2 = 4 days - 2 h.
        assert_eq!(
            monday.next_after(0, &tz),
            Some(4 * 86_400_000 - 2 * 3_600_000)
        );
    }

    #[test]
    fn impossible_date_gives_none_quickly() {
        let never = CronSchedule::parse("0 0 31 2 *").unwrap();
        assert_eq!(never.next_after(0, &TimeZone::UTC), None);
    }
}
