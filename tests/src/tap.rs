//! Reads the TAP output of a pgTAP file: the plan, and which tests passed or failed.

/// The verdict on one TAP stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TapReport {
    pub planned: Option<usize>,
    pub passed: usize,
    /// The `not ok` lines, with the diagnostics that follow each.
    pub failures: Vec<String>,
}

impl TapReport {
    pub fn parse(output: &str) -> TapReport {
        let mut report = TapReport::default();
        for line in output.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("1..") {
                report.planned = rest.trim().parse().ok();
            } else if line.starts_with("not ok ") {
                report.failures.push(line.to_string());
            } else if line.starts_with("ok ") {
                report.passed += 1;
            } else if line.starts_with('#') {
                if let Some(last) = report.failures.last_mut() {
                    last.push('\n');
                    last.push_str(line);
                }
            }
        }
        report
    }

    pub fn ran(&self) -> usize {
        self.passed + self.failures.len()
    }

    /// Passed means: a plan, every planned test ran, none failed.
    pub fn is_success(&self) -> bool {
        self.failures.is_empty() && self.planned.is_some_and(|n| n > 0 && n == self.ran())
    }
}

#[cfg(test)]
mod tests {
    use super::TapReport;

    #[test]
    fn a_complete_passing_run_is_a_success() {
        let r = TapReport::parse("1..2\nok 1 - a\nok 2 - b\n");
        assert!(r.is_success());
        assert_eq!(r.passed, 2);
    }

    #[test]
    fn a_failure_is_reported_with_its_diagnostics() {
        let r = TapReport::parse("1..2\nok 1 - a\nnot ok 2 - b\n# Failed test 2\n#   got: 1\n");
        assert!(!r.is_success());
        assert_eq!(r.failures.len(), 1);
        assert!(r.failures[0].contains("got: 1"));
    }

    #[test]
    fn a_run_that_stops_short_of_its_plan_is_not_a_success() {
        let r = TapReport::parse("1..3\nok 1 - a\nok 2 - b\n");
        assert!(!r.is_success());
    }

    #[test]
    fn output_without_a_plan_is_not_a_success() {
        assert!(!TapReport::parse("ok 1 - a\n").is_success());
        assert!(!TapReport::parse("").is_success());
    }
}
