//! The interlock arbiter: every relay command (manual, rule, macro, hold control, polling
//! master) passes through [`Safety::check`] before it is sent, and its outcome is fed back with
//! [`Safety::apply`] / [`Safety::observe`]. Sans-I/O: time comes in as Unix ms, nothing here
//! sleeps, sends or reads; the runtime sleeps until [`Safety::next_deadline_ms`] and sends what
//! [`Safety::due`] returns.
//!
//! Invariants (see docs/decisions/0005-interlocks-and-macros.md and the property tests):
//! - a plan is all-or-nothing: any refused part refuses the whole request;
//! - two relays of one mutex group are never on together: peers are switched off first, in the
//!   same command to the same slave;
//! - a relay is not switched on within its minimum off-time, nor kept on beyond its maximum
//!   on-time (the slave gets the capped duration too, so it switches off even if the Pi dies);
//! - while the emergency stop is latched nothing is switched on; switching off stays allowed for
//!   everyone, because off is always the safe direction.
//!
//! The runtime owns one `Safety` and calls `check`, sends the plan and calls `apply` before the
//! next `check` (two plans checked against the same state could otherwise both pass a hold).

mod holds;
mod interlocks;
mod persisted;
mod types;

pub use holds::{HOLD_PRIORITY, HoldError, Holds};
pub use interlocks::{
    InterlockError, Interlocks, MAX_RELAY, MutexGroup, RelayLimit, normalize_mac,
};

pub use persisted::{PersistedRelays, SafetyDelta};
pub use types::{Plan, PlannedSwitch, Refusal, RelayRef, Source, Switch, SwitchRequest};

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Priority of the arbiter's own offs (they ignore holds anyway).
pub const SAFETY_PRIORITY: i32 = 100;
/// Highest priority a request may carry.
pub const MAX_PRIORITY: i32 = 100;
/// An off the arbiter sent but has not seen confirmed is sent again after this long.
pub const OFF_RETRY_MS: i64 = 5_000;
/// Most switches in one command to one slave.
pub const MAX_SWITCHES: usize = 16;

/// Who switched a relay on, and so who may change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub source: Source,
    pub priority: i32,
}

/// What the arbiter believes of one relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RelayState {
    /// On since `since_ms` (continuously); switched off by [`Safety::due`] at `deadline_ms`.
    On {
        since_ms: i64,
        deadline_ms: Option<i64>,
        holder: Option<Holder>,
    },
    /// Off since `since_ms` (the start of its minimum off-time).
    Off { since_ms: i64 },
    /// The arbiter wants it off and has not seen that confirmed; [`Safety::due`] sends the off
    /// at `send_at_ms` (again every [`OFF_RETRY_MS`] until applied or observed off).
    OffPending { since_ms: i64, send_at_ms: i64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmergencyLatch {
    pub reason: String,
    pub by: String,
    pub since_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayEntry {
    pub relay: RelayRef,
    pub state: RelayState,
}

/// Everything a restart must not forget (persisted by the runtime).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafetySnapshot {
    pub relays: Vec<RelayEntry>,
    pub emergency: Option<EmergencyLatch>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Limit {
    max_on_s: Option<u32>,
    min_off_s: Option<u32>,
}

/// A mutex group seen with more than one relay on (a slave that booted or was switched at the
/// board that way, a report after a restart). Resolved at once by switching the whole group off:
/// which one was meant to be on cannot be known, and off is the state every group allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MutexViolation {
    pub group: String,
    pub master: String,
    pub slave_mac: String,
    /// The group's relays that were on, ascending.
    pub relays_on: Vec<u8>,
    pub at_ms: i64,
}

impl MutexViolation {
    /// The off for every relay of the group, ahead of anything else for that slave.
    pub fn resolution(&self, group_relays: &[u8]) -> Plan {
        Plan {
            master: self.master.clone(),
            slave_mac: self.slave_mac.clone(),
            source: Source::Safety,
            priority: SAFETY_PRIORITY,
            switches: group_relays
                .iter()
                .map(|&relay| PlannedSwitch {
                    relay,
                    on: false,
                    duration_s: 0,
                    note: Some(format!("mutex '{}' violated", self.group)),
                })
                .collect(),
            notes: vec![self.describe()],
        }
    }

    pub fn describe(&self) -> String {
        let relays: Vec<String> = self.relays_on.iter().map(u8::to_string).collect();
        format!(
            "mutex group '{}' found violated on {} {} (relays {} on): all of the group switched off",
            self.group,
            self.master,
            self.slave_mac,
            relays.join(", ")
        )
    }
}

/// The interlock arbiter.
#[derive(Debug)]
pub struct Safety {
    /// Group name and its relays, for each relay in a group.
    groups: BTreeMap<RelayRef, Vec<(String, Vec<u8>)>>,
    limits: BTreeMap<RelayRef, Limit>,
    default_max_on_s: Option<u32>,
    /// Set when the interlocks did not validate: then nothing may be switched on (fail safe).
    config_error: Option<String>,
    relays: BTreeMap<RelayRef, RelayState>,
    emergency: Option<EmergencyLatch>,
}

fn secs_ms(s: u32) -> i64 {
    i64::from(s) * 1000
}

impl Safety {
    /// Invalid interlocks do not panic: the arbiter then refuses every on (offs still pass),
    /// so a broken config can never silently drop a protection. Validate first to report it.
    pub fn new(interlocks: Interlocks) -> Safety {
        let config_error = interlocks.validate().err().map(|e| e.to_string());
        if let Some(e) = &config_error {
            tracing::error!(error = %e, "interlocks invalid: every switch-on will be refused");
        }
        let mut groups: BTreeMap<RelayRef, Vec<(String, Vec<u8>)>> = BTreeMap::new();
        for g in &interlocks.mutex_groups {
            let mut relays: Vec<u8> = g
                .relays
                .iter()
                .copied()
                .filter(|r| *r <= MAX_RELAY)
                .collect();
            relays.sort_unstable();
            relays.dedup();
            for &r in &relays {
                groups
                    .entry(RelayRef::new(&g.master, &g.slave_mac, r))
                    .or_default()
                    .push((g.name.clone(), relays.clone()));
            }
        }
        let mut limits = BTreeMap::new();
        for l in &interlocks.limits {
            limits.insert(
                RelayRef::new(&l.master, &l.slave_mac, l.relay),
                Limit {
                    max_on_s: l.max_on_seconds,
                    min_off_s: l.min_off_seconds,
                },
            );
        }
        Safety {
            groups,
            limits,
            default_max_on_s: interlocks.default_max_on_seconds,
            config_error,
            relays: BTreeMap::new(),
            emergency: None,
        }
    }

    /// Like [`Safety::new`] but refuses invalid interlocks.
    pub fn try_new(interlocks: Interlocks) -> Result<Safety, InterlockError> {
        interlocks.validate()?;
        Ok(Safety::new(interlocks))
    }

    fn max_on_s(&self, r: &RelayRef) -> Option<u32> {
        self.limits
            .get(r)
            .and_then(|l| l.max_on_s)
            .or(self.default_max_on_s)
            .filter(|m| *m > 0)
    }

    fn min_off_s(&self, r: &RelayRef) -> Option<u32> {
        self.limits.get(r).and_then(|l| l.min_off_s)
    }

    /// Every relay the arbiter knows of: seen in a state, or named by the config.
    fn known_relays(&self) -> BTreeSet<RelayRef> {
        self.relays
            .keys()
            .chain(self.groups.keys())
            .chain(self.limits.keys())
            .cloned()
            .collect()
    }

    /// Decides a request without changing anything: `Ok(plan)` to send, or why not.
    pub fn check(&self, request: &SwitchRequest, now_ms: i64) -> Result<Plan, Refusal> {
        let invalid = |s: String| Err(Refusal::Invalid(s));
        if !(0..=MAX_PRIORITY).contains(&request.priority) {
            return invalid(format!("priority {} out of 0..=100", request.priority));
        }
        if request.master.trim().is_empty() {
            return invalid("master device id is empty".into());
        }
        let Some(mac) = normalize_mac(&request.slave_mac) else {
            return invalid(format!(
                "slave MAC '{}' is not like AA:BB:CC:DD:EE:FF",
                request.slave_mac
            ));
        };
        if request.switches.is_empty() || request.switches.len() > MAX_SWITCHES {
            return invalid(format!(
                "{} switches (1..=16 per request)",
                request.switches.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for (r, _) in &request.switches {
            if *r > MAX_RELAY {
                return invalid(format!("relay {r} out of 0..=15"));
            }
            if !seen.insert(*r) {
                return invalid(format!("relay {r} appears twice"));
            }
        }
        let any_on = request
            .switches
            .iter()
            .any(|(_, s)| matches!(s, Switch::On { .. }));
        if any_on {
            if let Some(e) = &self.config_error {
                return invalid(format!(
                    "interlocks are invalid ({e}); only offs are allowed"
                ));
            }
            if request.source == Source::Safety {
                return invalid("the safety source only switches off".into());
            }
            if let Some(latch) = &self.emergency {
                return Err(Refusal::EmergencyStop {
                    reason: latch.reason.clone(),
                });
            }
        }
        let key = |relay: u8| RelayRef {
            master: request.master.clone(),
            slave_mac: mac.clone(),
            relay,
        };
        let ons: BTreeSet<u8> = request
            .switches
            .iter()
            .filter(|(_, s)| matches!(s, Switch::On { .. }))
            .map(|(r, _)| *r)
            .collect();

        // Offs first (asked-for ones and mutex peers, in request order), then the ons.
        let mut offs: Vec<PlannedSwitch> = Vec::new();
        let mut off_set: BTreeSet<u8> = BTreeSet::new();
        let mut on_list: Vec<(u8, u32)> = Vec::new();
        let mut notes = Vec::new();
        for (r, s) in &request.switches {
            match s {
                Switch::Off => {
                    if off_set.insert(*r) {
                        offs.push(PlannedSwitch {
                            relay: *r,
                            on: false,
                            duration_s: 0,
                            note: None,
                        });
                    }
                }
                Switch::On { duration_s } => {
                    for (group, members) in self.groups.get(&key(*r)).into_iter().flatten() {
                        for &peer in members.iter().filter(|p| **p != *r) {
                            if ons.contains(&peer) {
                                return Err(Refusal::MutexConflict {
                                    group: group.clone(),
                                });
                            }
                            // Always sent, even for a peer believed off: the belief may be
                            // stale (switched on at the board), and an extra off is harmless.
                            if off_set.insert(peer) {
                                notes
                                    .push(format!("mutex group '{group}': relay {peer} off first"));
                                offs.push(PlannedSwitch {
                                    relay: peer,
                                    on: false,
                                    duration_s: 0,
                                    note: Some(format!("mutex '{group}'")),
                                });
                            }
                        }
                    }
                    on_list.push((*r, *duration_s));
                }
            }
        }

        // Holds: a lower priority may not change a relay held at a higher one.
        if request.source != Source::Safety {
            let touched = offs
                .iter()
                .map(|s| s.relay)
                .chain(on_list.iter().map(|(r, _)| *r));
            for r in touched {
                if let Some(RelayState::On {
                    holder: Some(h), ..
                }) = self.relays.get(&key(r))
                    && h.priority > request.priority
                {
                    return Err(Refusal::HeldByHigherPriority {
                        relay: r,
                        holder_priority: h.priority,
                        holder: h.source,
                    });
                }
            }
        }

        let mut switches = offs;
        for (r, asked) in on_list {
            let k = key(r);
            let state = self.relays.get(&k);
            if let (
                Some(min_off),
                Some(RelayState::Off { since_ms } | RelayState::OffPending { since_ms, .. }),
            ) = (self.min_off_s(&k), state)
            {
                let ready = since_ms.saturating_add(secs_ms(min_off));
                if now_ms < ready {
                    let wait_ms = ready.saturating_sub(now_ms);
                    let remaining_s =
                        u32::try_from((wait_ms.saturating_add(999)) / 1000).unwrap_or(u32::MAX);
                    return Err(Refusal::MinOffTime {
                        relay: r,
                        remaining_s,
                    });
                }
            }
            let mut duration_s = asked;
            let mut note = None;
            if let Some(max_on) = self.max_on_s(&k) {
                // The on-time is continuous: switching on again does not restart it.
                let cap = match state {
                    Some(RelayState::On { since_ms, .. }) => {
                        let left =
                            secs_ms(max_on).saturating_sub(now_ms.saturating_sub(*since_ms).max(0));
                        let left_s = u32::try_from(left.max(0) / 1000).unwrap_or(0);
                        if left_s == 0 {
                            return Err(Refusal::MaxOnTime {
                                relay: r,
                                max_on_s: max_on,
                            });
                        }
                        left_s
                    }
                    _ => max_on,
                };
                if asked == 0 || asked > cap {
                    duration_s = cap;
                    let asked_txt = if asked == 0 {
                        "'until off'".to_string()
                    } else {
                        format!("{asked} s")
                    };
                    let already = if cap < max_on {
                        format!(" (already on, {cap} s left)")
                    } else {
                        String::new()
                    };
                    notes.push(format!(
                        "relay {r}: max on-time {max_on} s caps {asked_txt} to {cap} s{already}"
                    ));
                    note = Some(format!("max on-time {max_on} s"));
                }
            }
            switches.push(PlannedSwitch {
                relay: r,
                on: true,
                duration_s,
                note,
            });
        }
        Ok(Plan {
            master: request.master.clone(),
            slave_mac: mac,
            source: request.source,
            priority: request.priority,
            switches,
            notes,
        })
    }

    /// Records that `plan` was sent to the slave.
    pub fn apply(&mut self, plan: &Plan, now_ms: i64) {
        let mac = plan.slave_mac.to_ascii_uppercase();
        for s in &plan.switches {
            if s.relay > MAX_RELAY {
                continue;
            }
            let k = RelayRef {
                master: plan.master.clone(),
                slave_mac: mac.clone(),
                relay: s.relay,
            };
            let old = self.relays.get(&k).cloned();
            let new = if !s.on {
                match old {
                    Some(
                        RelayState::Off { since_ms } | RelayState::OffPending { since_ms, .. },
                    ) => RelayState::Off { since_ms },
                    _ => RelayState::Off { since_ms: now_ms },
                }
            } else if self.emergency.is_some() || plan.source == Source::Safety {
                // Sent anyway (checked before the latch): it must come straight back off.
                RelayState::OffPending {
                    since_ms: now_ms,
                    send_at_ms: now_ms,
                }
            } else {
                let since_ms = match old {
                    Some(RelayState::On { since_ms, .. }) => since_ms,
                    _ => now_ms,
                };
                let max_deadline = self
                    .max_on_s(&k)
                    .map(|m| since_ms.saturating_add(secs_ms(m)));
                let asked =
                    (s.duration_s > 0).then(|| now_ms.saturating_add(secs_ms(s.duration_s)));
                let deadline_ms = match (asked, max_deadline) {
                    (Some(a), Some(m)) => Some(a.min(m)),
                    (a, m) => a.or(m),
                };
                RelayState::On {
                    since_ms,
                    deadline_ms,
                    holder: Some(Holder {
                        source: plan.source,
                        priority: plan.priority,
                    }),
                }
            };
            self.relays.insert(k, new);
        }
    }

    /// The slave's truth (ack or state report), relay `i` = `states[i]`. Returns the mutex
    /// groups of that slave it shows violated, each with its resolution (the whole group off),
    /// which the caller must carry out.
    pub fn observe(
        &mut self,
        master: &str,
        slave_mac: &str,
        states: &[bool],
        now_ms: i64,
    ) -> Vec<(MutexViolation, Plan)> {
        let Some(mac) = normalize_mac(slave_mac) else {
            tracing::warn!(slave_mac, "state of a slave with a malformed MAC ignored");
            return Vec::new();
        };
        for (i, &on) in states.iter().enumerate().take(usize::from(MAX_RELAY) + 1) {
            let k = RelayRef {
                master: master.to_string(),
                slave_mac: mac.clone(),
                relay: i as u8,
            };
            let old = self.relays.get(&k).cloned();
            let new = match (on, old) {
                (
                    false,
                    Some(RelayState::Off { since_ms } | RelayState::OffPending { since_ms, .. }),
                ) => RelayState::Off { since_ms },
                // Seen off now; it went off at the latest now (the conservative start of min-off).
                (false, _) => RelayState::Off { since_ms: now_ms },
                (true, Some(st @ (RelayState::On { .. } | RelayState::OffPending { .. }))) => st,
                (true, _) if self.emergency.is_some() => RelayState::OffPending {
                    since_ms: now_ms,
                    send_at_ms: now_ms,
                },
                // On without us knowing since when: its max on-time starts now.
                (true, _) => RelayState::On {
                    since_ms: now_ms,
                    deadline_ms: self.max_on_s(&k).map(|m| now_ms.saturating_add(secs_ms(m))),
                    holder: None,
                },
            };
            self.relays.insert(k, new);
        }
        self.violations_of(master, &mac, states, now_ms)
    }

    /// The groups of one slave with more than one relay on in `states`.
    fn violations_of(
        &self,
        master: &str,
        mac: &str,
        states: &[bool],
        now_ms: i64,
    ) -> Vec<(MutexViolation, Plan)> {
        let mut seen = BTreeSet::new();
        let mut found = Vec::new();
        for (k, groups) in self.groups.range(RelayRef::new(master, mac, 0)..) {
            if k.master != master || k.slave_mac != mac {
                break;
            }
            for (name, relays) in groups {
                if !seen.insert(name.clone()) {
                    continue;
                }
                let on: Vec<u8> = relays
                    .iter()
                    .copied()
                    .filter(|&r| states.get(usize::from(r)).copied().unwrap_or(false))
                    .collect();
                if on.len() > 1 {
                    let violation = MutexViolation {
                        group: name.clone(),
                        master: master.to_string(),
                        slave_mac: mac.to_string(),
                        relays_on: on,
                        at_ms: now_ms,
                    };
                    let plan = violation.resolution(relays);
                    found.push((violation, plan));
                }
            }
        }
        found
    }

    /// The arbiter's own offs that are due now, one plan per slave (source Safety).
    pub fn due(&mut self, now_ms: i64) -> Vec<Plan> {
        let mut per_slave: BTreeMap<(String, String), Vec<PlannedSwitch>> = BTreeMap::new();
        let mut notes: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (k, st) in self.relays.iter_mut() {
            let why = match st {
                RelayState::On {
                    deadline_ms: Some(d),
                    ..
                } if *d <= now_ms => {
                    *st = RelayState::OffPending {
                        since_ms: now_ms,
                        send_at_ms: now_ms.saturating_add(OFF_RETRY_MS),
                    };
                    "off-deadline reached"
                }
                RelayState::OffPending { send_at_ms, .. } if *send_at_ms <= now_ms => {
                    *send_at_ms = now_ms.saturating_add(OFF_RETRY_MS);
                    if self.emergency.is_some() {
                        "emergency stop"
                    } else {
                        "off not confirmed yet"
                    }
                }
                _ => continue,
            };
            let slave = (k.master.clone(), k.slave_mac.clone());
            notes
                .entry(slave.clone())
                .or_default()
                .push(format!("relay {}: {why}", k.relay));
            per_slave.entry(slave).or_default().push(PlannedSwitch {
                relay: k.relay,
                on: false,
                duration_s: 0,
                note: Some(why.to_string()),
            });
        }
        per_slave
            .into_iter()
            .map(|(slave, switches)| {
                let notes = notes.remove(&slave).unwrap_or_default();
                Plan {
                    master: slave.0,
                    slave_mac: slave.1,
                    source: Source::Safety,
                    priority: SAFETY_PRIORITY,
                    switches,
                    notes,
                }
            })
            .collect()
    }

    /// When [`Safety::due`] next has something to do.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        self.relays
            .values()
            .filter_map(|st| match st {
                RelayState::On { deadline_ms, .. } => *deadline_ms,
                RelayState::OffPending { send_at_ms, .. } => Some(*send_at_ms),
                RelayState::Off { .. } => None,
            })
            .min()
    }

    /// Latches the emergency stop: every known relay is to be switched off (by the next
    /// [`Safety::due`]), holds are cleared. True if it was not latched before.
    pub fn emergency_stop(&mut self, reason: &str, by: &str, now_ms: i64) -> bool {
        let newly = self.emergency.is_none();
        if newly {
            tracing::warn!(reason, by, "emergency stop latched");
            self.emergency = Some(EmergencyLatch {
                reason: reason.to_string(),
                by: by.to_string(),
                since_ms: now_ms,
            });
        }
        for k in self.known_relays() {
            let since_ms = match self.relays.get(&k) {
                Some(RelayState::Off { since_ms } | RelayState::OffPending { since_ms, .. }) => {
                    *since_ms
                }
                _ => now_ms,
            };
            self.relays.insert(
                k,
                RelayState::OffPending {
                    since_ms,
                    send_at_ms: now_ms,
                },
            );
        }
        newly
    }

    /// Unlatches the emergency stop; nothing switches back on by itself. True if it was latched.
    pub fn reset(&mut self, by: &str, now_ms: i64) -> bool {
        match self.emergency.take() {
            Some(latch) => {
                tracing::warn!(by, now_ms, reason = %latch.reason, "emergency stop reset");
                true
            }
            None => false,
        }
    }

    /// Why the interlocks given to [`Safety::new`] are invalid (then every on is refused).
    pub fn config_error(&self) -> Option<&str> {
        self.config_error.as_deref()
    }

    pub fn emergency(&self) -> Option<&EmergencyLatch> {
        self.emergency.as_ref()
    }

    /// What the arbiter believes of one relay.
    pub fn state(&self, relay: &RelayRef) -> Option<&RelayState> {
        self.relays.get(relay)
    }

    pub fn snapshot(&self) -> SafetySnapshot {
        SafetySnapshot {
            relays: self
                .relays
                .iter()
                .map(|(relay, state)| RelayEntry {
                    relay: relay.clone(),
                    state: state.clone(),
                })
                .collect(),
            emergency: self.emergency.clone(),
        }
    }

    /// Replaces the relay states and the latch with a persisted snapshot (the interlocks stay
    /// those given to [`Safety::new`]). Deadlines that passed while down are due at once.
    pub fn restore(&mut self, snapshot: SafetySnapshot) {
        self.relays = snapshot
            .relays
            .into_iter()
            // A relay number no slave has cannot be on; keeping it would only make bad plans.
            .filter(|e| e.relay.relay <= MAX_RELAY)
            .map(|e| {
                let mut relay = e.relay;
                relay.slave_mac = relay.slave_mac.to_ascii_uppercase();
                (relay, e.state)
            })
            .collect();
        self.emergency = snapshot.emergency;
        // A latched snapshot with relays on (cut short while sending the offs): off at once.
        if let Some(latch) = &self.emergency {
            for st in self.relays.values_mut() {
                if matches!(st, RelayState::On { .. }) {
                    *st = RelayState::OffPending {
                        since_ms: latch.since_ms,
                        send_at_ms: latch.since_ms,
                    };
                }
            }
        }
    }

    /// Relays believed on, with their off-deadline.
    pub fn relays_on(&self) -> Vec<(RelayRef, Option<i64>)> {
        self.relays
            .iter()
            .filter_map(|(k, st)| match st {
                RelayState::On { deadline_ms, .. } => Some((k.clone(), *deadline_ms)),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
