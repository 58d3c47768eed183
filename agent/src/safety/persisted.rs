//! What of the arbiter's state a decision writes: the relays that changed since the last write,
//! not every relay the Pi has seen. Sans-I/O; the store applies a [`SafetyDelta`] in the
//! decision's transaction.

use std::collections::BTreeMap;

use super::{EmergencyLatch, RelayEntry, RelayRef, RelayState, SafetySnapshot};

/// The arbiter's change since the last write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SafetyDelta {
    /// Forget every relay on disk first: the first write after a start, or after a write
    /// that failed (what is on disk is then not known).
    pub replace_all: bool,
    /// Relays whose state is new or changed.
    pub changed: Vec<RelayEntry>,
    /// Relays the arbiter no longer keeps.
    pub removed: Vec<RelayRef>,
    /// The latch, always written whole (it is small).
    pub emergency: Option<EmergencyLatch>,
}

impl SafetyDelta {
    /// Folds a later delta into this one, as if both were written one after the other.
    pub fn absorb(&mut self, later: SafetyDelta) {
        if later.replace_all {
            *self = later;
            return;
        }
        for entry in later.changed {
            self.removed.retain(|r| *r != entry.relay);
            match self.changed.iter_mut().find(|e| e.relay == entry.relay) {
                Some(e) => *e = entry,
                None => self.changed.push(entry),
            }
        }
        for relay in later.removed {
            self.changed.retain(|e| e.relay != relay);
            if !self.removed.contains(&relay) {
                self.removed.push(relay);
            }
        }
        self.emergency = later.emergency;
    }
}

/// The relay states last handed to the store, to tell what changed.
#[derive(Debug)]
pub struct PersistedRelays {
    written: BTreeMap<RelayRef, RelayState>,
    replace_all: bool,
}

impl Default for PersistedRelays {
    fn default() -> Self {
        // Nothing known of the disk yet: the first write replaces it.
        PersistedRelays {
            written: BTreeMap::new(),
            replace_all: true,
        }
    }
}

impl PersistedRelays {
    /// What `snapshot` changes against the last write; from now on it is what was written.
    pub fn delta(&mut self, snapshot: SafetySnapshot) -> SafetyDelta {
        let replace_all = std::mem::take(&mut self.replace_all);
        if replace_all {
            self.written.clear();
        }
        let mut current = BTreeMap::new();
        let mut changed = Vec::new();
        for RelayEntry { relay, state } in snapshot.relays {
            if self.written.get(&relay) != Some(&state) {
                changed.push(RelayEntry {
                    relay: relay.clone(),
                    state: state.clone(),
                });
            }
            current.insert(relay, state);
        }
        let removed = self
            .written
            .keys()
            .filter(|r| !current.contains_key(*r))
            .cloned()
            .collect();
        self.written = current;
        SafetyDelta {
            replace_all,
            changed,
            removed,
            emergency: snapshot.emergency,
        }
    }

    /// A write failed: the next delta replaces everything on disk.
    pub fn forget(&mut self) {
        self.replace_all = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(relay: u8, since_ms: i64) -> RelayEntry {
        RelayEntry {
            relay: RelayRef::new("m1", "aa:bb:cc:dd:ee:ff", relay),
            state: RelayState::Off { since_ms },
        }
    }

    fn snapshot(entries: &[RelayEntry]) -> SafetySnapshot {
        SafetySnapshot {
            relays: entries.to_vec(),
            emergency: None,
        }
    }

    #[test]
    fn only_changed_and_removed_relays_are_written_after_the_first_write() {
        let mut persisted = PersistedRelays::default();
        let first = persisted.delta(snapshot(&[entry(0, 1), entry(1, 1), entry(2, 1)]));
        assert!(first.replace_all, "the first write replaces the disk");
        assert_eq!(first.changed.len(), 3);

        let second = persisted.delta(snapshot(&[entry(0, 1), entry(1, 5)]));
        assert!(!second.replace_all);
        assert_eq!(second.changed, vec![entry(1, 5)]);
        assert_eq!(second.removed, vec![entry(2, 1).relay]);

        let same = persisted.delta(snapshot(&[entry(0, 1), entry(1, 5)]));
        assert!(same.changed.is_empty() && same.removed.is_empty());
    }

    #[test]
    fn after_a_failed_write_the_next_delta_replaces_everything() {
        let mut persisted = PersistedRelays::default();
        persisted.delta(snapshot(&[entry(0, 1), entry(1, 1)]));
        persisted.forget();
        let again = persisted.delta(snapshot(&[entry(0, 1)]));
        assert!(again.replace_all);
        assert_eq!(
            again.changed,
            vec![entry(0, 1)],
            "every relay, changed or not"
        );
    }

    #[test]
    fn absorbed_deltas_write_what_both_in_turn_would() {
        let mut persisted = PersistedRelays::default();
        persisted.delta(snapshot(&[entry(0, 1), entry(1, 1)]));
        let mut a = persisted.delta(snapshot(&[entry(0, 2)]));
        let b = persisted.delta(snapshot(&[entry(0, 3), entry(1, 4)]));
        a.absorb(b);
        assert_eq!(a.changed, vec![entry(0, 3), entry(1, 4)]);
        assert!(a.removed.is_empty(), "relay 1 came back: {:?}", a.removed);
        let mut c = persisted.delta(snapshot(&[entry(1, 4)]));
        c.absorb(persisted.delta(snapshot(&[])));
        assert!(c.changed.is_empty());
        assert_eq!(c.removed.len(), 2);
    }
}
