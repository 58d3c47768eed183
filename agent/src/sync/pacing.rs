//! How long the poll loop waits before its next sync: short after work came in, doubling while
//! idle up to a bound, the bound while the backend does not answer (docs/decisions/0021).
//! Sans-I/O: the loop reports what each call found.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct PollPacing {
    active: Duration,
    idle: Duration,
    next: Duration,
}

impl PollPacing {
    /// `active`: the wait after work came in; `idle`: the longest wait. `active` above `idle`
    /// is taken as `idle`.
    pub fn new(active: Duration, idle: Duration) -> PollPacing {
        let active = active.min(idle);
        PollPacing {
            active,
            idle,
            next: active,
        }
    }

    pub fn next_wait(&self) -> Duration {
        self.next
    }

    /// Commands, rules or settings came in: more may follow soon.
    pub fn on_work(&mut self) {
        self.next = self.active;
    }

    /// Nothing new: wait twice as long, up to the bound.
    pub fn on_idle(&mut self) {
        self.next = (self.next * 2).min(self.idle);
    }

    /// No answer: try again at the bound, so an outage is judged as often as before and a
    /// backend coming back is not hammered.
    pub fn on_no_answer(&mut self) {
        self.next = self.idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn idle_doubles_up_to_the_bound_and_work_resets_it() {
        let mut pacing = PollPacing::new(ms(250), ms(800));
        assert_eq!(pacing.next_wait(), ms(250));
        pacing.on_idle();
        assert_eq!(pacing.next_wait(), ms(500));
        pacing.on_idle();
        assert_eq!(pacing.next_wait(), ms(800));
        pacing.on_idle();
        assert_eq!(pacing.next_wait(), ms(800), "never beyond the bound");
        pacing.on_work();
        assert_eq!(pacing.next_wait(), ms(250));
    }

    #[test]
    fn no_answer_waits_the_bound_and_active_never_exceeds_it() {
        let mut pacing = PollPacing::new(ms(250), ms(800));
        pacing.on_no_answer();
        assert_eq!(pacing.next_wait(), ms(800));
        let pacing = PollPacing::new(ms(250), ms(100));
        assert_eq!(pacing.next_wait(), ms(100));
    }
}
