//! Which masters are alive, from everything the agent hears of them.
//!
//! Any message a master publishes on its own topics proves it alive: the broker admits only the
//! master's own login to them (PROTOCOL.md, broker credentials). Telemetry every second keeps a
//! master online as well as its status does; a master with nothing else to say publishes its
//! status online as a heartbeat (PROTOCOL.md). Sans-I/O: the MQTT loop feeds it what it hears
//! and the time, and writes what it answers to the store.
//!
//! Hearing a master usually costs no write: its last-heard time is kept here and handed to the
//! store in batches (`take_unsaved`), with the telemetry flush. Only a master that comes online
//! (first heard in this run, after its offline status, or after a silence the store may have
//! marked offline) needs its presence recorded at once.

use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
struct Heard {
    last_ms: i64,
    /// Said offline (last will, shutdown): the next message brings it back.
    offline: bool,
    /// The last-heard time changed since it was last handed to the store.
    unsaved: bool,
}

#[derive(Debug)]
pub struct Liveness {
    /// After this long unheard the store's check marks a master offline; a master heard again
    /// after such a gap is recorded online again.
    silent_after_ms: i64,
    masters: HashMap<String, Heard>,
}

/// What hearing a master means for its recorded presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Not online as far as this run knows: record it online now.
    CameOnline,
    /// Online and heard recently: only its last-heard time moves.
    StillOnline,
}

impl Liveness {
    pub fn new(silent_after_ms: u64) -> Liveness {
        Liveness {
            silent_after_ms: silent_after_ms as i64,
            masters: HashMap::new(),
        }
    }

    /// A message from `master` (anything but an offline status) at `now_ms`.
    pub fn heard(&mut self, master: &str, now_ms: i64) -> Presence {
        let silent_after = self.silent_after_ms;
        match self.masters.get_mut(master) {
            Some(h) => {
                let came_back = h.offline || now_ms - h.last_ms > silent_after;
                h.last_ms = h.last_ms.max(now_ms);
                h.offline = false;
                h.unsaved = true;
                if came_back {
                    Presence::CameOnline
                } else {
                    Presence::StillOnline
                }
            }
            None => {
                self.masters.insert(
                    master.to_string(),
                    Heard {
                        last_ms: now_ms,
                        offline: false,
                        unsaved: true,
                    },
                );
                Presence::CameOnline
            }
        }
    }

    /// `master` said it is offline (its last will, or a clean shutdown).
    pub fn said_offline(&mut self, master: &str, now_ms: i64) {
        let h = self.masters.entry(master.to_string()).or_insert(Heard {
            last_ms: now_ms,
            offline: true,
            unsaved: false,
        });
        h.offline = true;
        // Its offline record carries the time; nothing more to save.
        h.unsaved = false;
    }

    /// The last-heard times of online masters not yet handed to the store.
    pub fn take_unsaved(&mut self) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for (id, h) in &mut self.masters {
            if h.unsaved && !h.offline {
                h.unsaved = false;
                out.push((id.clone(), h.last_ms));
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_message_of_a_run_records_the_master_online_and_later_ones_do_not() {
        let mut l = Liveness::new(30_000);
        assert_eq!(l.heard("M1", 1_000), Presence::CameOnline);
        assert_eq!(l.heard("M1", 2_000), Presence::StillOnline);
        assert_eq!(l.heard("M1", 31_000), Presence::StillOnline);
        assert_eq!(l.heard("M2", 31_000), Presence::CameOnline);
    }

    #[test]
    fn a_master_heard_after_its_offline_status_comes_back_online() {
        let mut l = Liveness::new(30_000);
        l.heard("M1", 1_000);
        l.said_offline("M1", 2_000);
        assert!(
            l.take_unsaved().is_empty(),
            "an offline master's time is not saved"
        );
        assert_eq!(l.heard("M1", 3_000), Presence::CameOnline);
        assert_eq!(l.take_unsaved(), vec![("M1".to_string(), 3_000)]);
    }

    #[test]
    fn a_master_heard_after_a_silence_longer_than_the_timeout_is_recorded_online_again() {
        // The store's check may have marked it offline meanwhile.
        let mut l = Liveness::new(30_000);
        l.heard("M1", 1_000);
        assert_eq!(l.heard("M1", 31_001), Presence::CameOnline);
        assert_eq!(l.heard("M1", 32_000), Presence::StillOnline);
    }

    #[test]
    fn unsaved_times_are_handed_over_once_with_the_latest_time() {
        let mut l = Liveness::new(30_000);
        l.heard("M2", 5);
        l.heard("M1", 1);
        l.heard("M1", 9);
        // A late message stamped earlier never moves the time back.
        l.heard("M1", 7);
        assert_eq!(
            l.take_unsaved(),
            vec![("M1".to_string(), 9), ("M2".to_string(), 5)]
        );
        assert!(l.take_unsaved().is_empty());
        l.heard("M2", 6);
        assert_eq!(l.take_unsaved(), vec![("M2".to_string(), 6)]);
    }
}
