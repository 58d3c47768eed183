//! The interlock configuration (mutex groups, per-relay limits) and its validation.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Highest relay number on a slave board (16 relays, 0..=15).
pub const MAX_RELAY: u8 = 15;

/// Relays of one slave that must never be on together (e.g. "Marcha Frente" / "Marcha Ré").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// A misspelt key ("max_on_second") must not silently drop a protection.
#[serde(deny_unknown_fields)]
pub struct MutexGroup {
    pub name: String,
    pub master: String,
    pub slave_mac: String,
    pub relays: Vec<u8>,
}

/// Time limits of one relay; `None` means no limit (max-on falls back to the default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayLimit {
    pub master: String,
    pub slave_mac: String,
    pub relay: u8,
    #[serde(default)]
    pub max_on_seconds: Option<u32>,
    #[serde(default)]
    pub min_off_seconds: Option<u32>,
}

/// The `[interlocks]` part of the config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interlocks {
    #[serde(default)]
    pub mutex_groups: Vec<MutexGroup>,
    #[serde(default)]
    pub limits: Vec<RelayLimit>,
    #[serde(default)]
    pub default_max_on_seconds: Option<u32>,
}

/// Why an interlock configuration is refused; every message names the group or relay.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InterlockError {
    #[error("mutex group '{group}': needs at least 2 distinct relays")]
    GroupTooSmall { group: String },
    #[error("mutex group '{group}': relay {relay} out of 0..=15")]
    GroupRelayOutOfRange { group: String, relay: u8 },
    #[error("mutex group '{group}': relay {relay} listed twice")]
    GroupDuplicateRelay { group: String, relay: u8 },
    #[error("mutex group '{group}': defined twice")]
    DuplicateGroup { group: String },
    #[error("mutex group with an empty name")]
    UnnamedGroup,
    #[error("{what}: master device id is empty")]
    EmptyMaster { what: String },
    #[error("{what}: slave MAC '{mac}' is not like AA:BB:CC:DD:EE:FF")]
    BadMac { what: String, mac: String },
    #[error("limit of relay {relay} on {slave_mac}: relay out of 0..=15")]
    LimitRelayOutOfRange { slave_mac: String, relay: u8 },
    #[error("limit of relay {relay} on {slave_mac}: {field} must be > 0")]
    ZeroLimit {
        slave_mac: String,
        relay: u8,
        field: &'static str,
    },
    #[error("limit of relay {relay} on {slave_mac}: defined twice")]
    DuplicateLimit { slave_mac: String, relay: u8 },
    #[error("default_max_on_seconds must be > 0")]
    ZeroDefaultMaxOn,
}

/// `Some(upper-case MAC)` when `mac` looks like `AA:BB:CC:DD:EE:FF` (any case).
pub fn normalize_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    ok.then(|| mac.to_ascii_uppercase())
}

fn check_slave(what: &str, master: &str, mac: &str) -> Result<(), InterlockError> {
    if master.trim().is_empty() {
        return Err(InterlockError::EmptyMaster { what: what.into() });
    }
    if normalize_mac(mac).is_none() {
        return Err(InterlockError::BadMac {
            what: what.into(),
            mac: mac.into(),
        });
    }
    Ok(())
}

impl Interlocks {
    /// Refuses configurations the arbiter could not enforce. A group is one slave by
    /// construction: the "peers off first" order is only guaranteed inside one command to one
    /// slave, so there is no way to express a cross-slave group.
    pub fn validate(&self) -> Result<(), InterlockError> {
        let mut names = BTreeSet::new();
        for g in &self.mutex_groups {
            if g.name.trim().is_empty() {
                return Err(InterlockError::UnnamedGroup);
            }
            if !names.insert(g.name.as_str()) {
                return Err(InterlockError::DuplicateGroup {
                    group: g.name.clone(),
                });
            }
            check_slave(
                &format!("mutex group '{}'", g.name),
                &g.master,
                &g.slave_mac,
            )?;
            let mut seen = BTreeSet::new();
            for &r in &g.relays {
                if r > MAX_RELAY {
                    return Err(InterlockError::GroupRelayOutOfRange {
                        group: g.name.clone(),
                        relay: r,
                    });
                }
                if !seen.insert(r) {
                    return Err(InterlockError::GroupDuplicateRelay {
                        group: g.name.clone(),
                        relay: r,
                    });
                }
            }
            if seen.len() < 2 {
                return Err(InterlockError::GroupTooSmall {
                    group: g.name.clone(),
                });
            }
        }
        let mut limits = BTreeSet::new();
        for l in &self.limits {
            let what = format!("limit of relay {} on {}", l.relay, l.slave_mac);
            check_slave(&what, &l.master, &l.slave_mac)?;
            if l.relay > MAX_RELAY {
                return Err(InterlockError::LimitRelayOutOfRange {
                    slave_mac: l.slave_mac.clone(),
                    relay: l.relay,
                });
            }
            for (field, v) in [
                ("max_on_seconds", l.max_on_seconds),
                ("min_off_seconds", l.min_off_seconds),
            ] {
                if v == Some(0) {
                    return Err(InterlockError::ZeroLimit {
                        slave_mac: l.slave_mac.clone(),
                        relay: l.relay,
                        field,
                    });
                }
            }
            let key = (
                l.master.clone(),
                normalize_mac(&l.slave_mac).unwrap_or_default(),
                l.relay,
            );
            if !limits.insert(key) {
                return Err(InterlockError::DuplicateLimit {
                    slave_mac: l.slave_mac.clone(),
                    relay: l.relay,
                });
            }
        }
        if self.default_max_on_seconds == Some(0) {
            return Err(InterlockError::ZeroDefaultMaxOn);
        }
        Ok(())
    }
}
