//! The agent's view of its link to the backend, as a state machine without I/O: reachable or
//! not, when an outage began and ended, and whether sync is stalled (the backend answers but the
//! outbox makes no progress), so that a stall is visible and healed instead of silent.

/// Something the driver must record or act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    OutageBegan {
        at_ms: i64,
    },
    /// The backend answers again after `duration_ms`.
    OutageEnded {
        began_at_ms: i64,
        duration_ms: i64,
    },
    /// No outbox progress for the stall window while the backend answers: restart the sync.
    Stalled {
        since_ms: i64,
    },
}

#[derive(Debug, Clone)]
pub struct Link {
    stall_after_ms: i64,
    reachable: bool,
    outage_began_ms: Option<i64>,
    last_progress_ms: i64,
    stalled: bool,
}

impl Link {
    /// `stall_after_ms`: how long the outbox may hold rows without progress while the backend
    /// answers before the sync counts as stalled.
    pub fn new(stall_after_ms: i64, now_ms: i64) -> Link {
        Link {
            stall_after_ms,
            reachable: true,
            outage_began_ms: None,
            last_progress_ms: now_ms,
            stalled: false,
        }
    }

    pub fn is_reachable(&self) -> bool {
        self.reachable
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled
    }

    pub fn outage_began_ms(&self) -> Option<i64> {
        self.outage_began_ms
    }

    /// A request got an answer (even a refusal: the backend is up).
    pub fn on_answer(&mut self, now_ms: i64) -> Option<LinkEvent> {
        self.reachable = true;
        self.outage_began_ms
            .take()
            .map(|began| LinkEvent::OutageEnded {
                began_at_ms: began,
                duration_ms: now_ms - began,
            })
    }

    /// A request got no answer at all.
    pub fn on_no_answer(&mut self, now_ms: i64) -> Option<LinkEvent> {
        self.reachable = false;
        if self.outage_began_ms.is_some() {
            return None;
        }
        self.outage_began_ms = Some(now_ms);
        Some(LinkEvent::OutageBegan { at_ms: now_ms })
    }

    /// Rows reached the backend, or the outbox is empty: sync is moving.
    pub fn on_progress(&mut self, now_ms: i64) {
        self.last_progress_ms = now_ms;
        self.stalled = false;
    }

    /// Called periodically with the outbox depth.
    pub fn check_stall(&mut self, outbox_depth: u64, now_ms: i64) -> Option<LinkEvent> {
        if outbox_depth == 0 || !self.reachable {
            // Nothing to move, or an outage explains it: not a stall.
            self.on_progress(now_ms);
            return None;
        }
        if !self.stalled && now_ms - self.last_progress_ms >= self.stall_after_ms {
            self.stalled = true;
            return Some(LinkEvent::Stalled {
                since_ms: self.last_progress_ms,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_begins_once_and_ends_with_its_duration() {
        let mut link = Link::new(10_000, 0);
        assert_eq!(
            link.on_no_answer(100),
            Some(LinkEvent::OutageBegan { at_ms: 100 })
        );
        assert_eq!(link.on_no_answer(200), None);
        assert!(!link.is_reachable());
        assert_eq!(
            link.on_answer(60_100),
            Some(LinkEvent::OutageEnded {
                began_at_ms: 100,
                duration_ms: 60_000
            })
        );
        assert_eq!(link.on_answer(60_200), None);
    }

    #[test]
    fn a_backend_that_answers_while_nothing_moves_is_a_stall() {
        let mut link = Link::new(10_000, 0);
        assert_eq!(link.check_stall(5, 9_999), None);
        assert_eq!(
            link.check_stall(5, 10_000),
            Some(LinkEvent::Stalled { since_ms: 0 })
        );
        assert!(link.is_stalled());
        assert_eq!(link.check_stall(5, 20_000), None, "reported once");
        link.on_progress(20_001);
        assert!(!link.is_stalled());
    }

    #[test]
    fn an_outage_or_an_empty_outbox_is_not_a_stall() {
        let mut link = Link::new(10_000, 0);
        link.on_no_answer(1);
        assert_eq!(link.check_stall(5, 50_000), None);
        link.on_answer(50_001);
        assert_eq!(link.check_stall(0, 70_000), None);
        assert_eq!(link.check_stall(5, 79_999), None);
    }
}
