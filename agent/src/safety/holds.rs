//! Hold (momentary, "dead man") controls: on while the button is held, off on release, and
//! never longer than a maximum. The On carries that maximum as its duration, so the slave
//! switches off by itself even if the Pi dies while the button is held.

use super::{MAX_RELAY, RelayRef, Source, Switch, SwitchRequest, normalize_mac};
use std::collections::BTreeMap;

/// Priority of hold controls: a person is at the button and watching.
pub const HOLD_PRIORITY: i32 = 90;
/// Longest a hold may last.
pub const MAX_HOLD_SECONDS: u32 = 3600;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    #[error("{relay} is already held by {by}")]
    AlreadyHeld { relay: String, by: String },
    #[error("hold maximum {0} s out of 1..=3600")]
    BadDuration(u32),
    #[error("invalid relay: {0}")]
    InvalidRelay(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    by: String,
    until_ms: i64,
}

/// The hold controls currently pressed.
#[derive(Clone, Debug)]
pub struct Holds {
    priority: i32,
    held: BTreeMap<RelayRef, Held>,
}

impl Default for Holds {
    fn default() -> Self {
        Holds::new()
    }
}

impl Holds {
    pub fn new() -> Holds {
        Holds::with_priority(HOLD_PRIORITY)
    }

    pub fn with_priority(priority: i32) -> Holds {
        Holds {
            priority: priority.clamp(0, 100),
            held: BTreeMap::new(),
        }
    }

    fn request(&self, relay: &RelayRef, switch: Switch) -> SwitchRequest {
        SwitchRequest {
            source: Source::Hold,
            priority: self.priority,
            master: relay.master.clone(),
            slave_mac: relay.slave_mac.clone(),
            switches: vec![(relay.relay, switch)],
        }
    }

    /// The On for a newly pressed control. If the arbiter refuses it, call [`Holds::cancel`].
    pub fn press(
        &mut self,
        relay: RelayRef,
        max_seconds: u32,
        by: &str,
        now_ms: i64,
    ) -> Result<SwitchRequest, HoldError> {
        if !(1..=MAX_HOLD_SECONDS).contains(&max_seconds) {
            return Err(HoldError::BadDuration(max_seconds));
        }
        let Some(mac) = normalize_mac(&relay.slave_mac) else {
            return Err(HoldError::InvalidRelay(format!(
                "slave MAC '{}' is not like AA:BB:CC:DD:EE:FF",
                relay.slave_mac
            )));
        };
        if relay.relay > MAX_RELAY || relay.master.trim().is_empty() {
            return Err(HoldError::InvalidRelay(relay.to_string()));
        }
        let relay = RelayRef {
            slave_mac: mac,
            ..relay
        };
        if let Some(h) = self.held.get(&relay) {
            return Err(HoldError::AlreadyHeld {
                relay: relay.to_string(),
                by: h.by.clone(),
            });
        }
        let req = self.request(
            &relay,
            Switch::On {
                duration_s: max_seconds,
            },
        );
        self.held.insert(
            relay,
            Held {
                by: by.to_string(),
                until_ms: now_ms.saturating_add(i64::from(max_seconds) * 1000),
            },
        );
        Ok(req)
    }

    /// The Off for a released control (None if it was not held, e.g. its maximum already ended).
    pub fn release(&mut self, relay: &RelayRef, _now_ms: i64) -> Option<SwitchRequest> {
        let key = RelayRef::new(&relay.master, &relay.slave_mac, relay.relay);
        self.held.remove(&key)?;
        Some(self.request(&key, Switch::Off))
    }

    /// Forgets a press whose On was refused (no Off is produced).
    pub fn cancel(&mut self, relay: &RelayRef) -> bool {
        let key = RelayRef::new(&relay.master, &relay.slave_mac, relay.relay);
        self.held.remove(&key).is_some()
    }

    /// Offs for holds whose maximum ended.
    pub fn due(&mut self, now_ms: i64) -> Vec<SwitchRequest> {
        let ended: Vec<RelayRef> = self
            .held
            .iter()
            .filter(|(_, h)| h.until_ms <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        ended
            .into_iter()
            .map(|k| {
                self.held.remove(&k);
                self.request(&k, Switch::Off)
            })
            .collect()
    }

    pub fn next_deadline_ms(&self) -> Option<i64> {
        self.held.values().map(|h| h.until_ms).min()
    }

    pub fn is_held(&self, relay: &RelayRef) -> bool {
        self.held
            .contains_key(&RelayRef::new(&relay.master, &relay.slave_mac, relay.relay))
    }
}
