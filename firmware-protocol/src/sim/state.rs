//! What survives a simulated reboot: the master's replay counter, applied command ids and
//! emergency latch, and each slave's latch and applied (command id, relay) pairs, as small JSON
//! files in the state folder.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::mac::MacAddr;
use crate::message::DeviceId;

use super::SimError;

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlavePersisted {
    pub emergency_latched: bool,
    /// The (command id, relay) pairs the slave applied, oldest first: a master killed before
    /// its slave's confirmation reached it sends the command again after its reboot, and the
    /// slave must still answer `duplicate` (a real slave keeps running while its master reboots).
    #[serde(default)]
    pub applied: Vec<(u64, u8)>,
}

/// One relay switched by a command at a slave, as a line of the slave's actuation log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Actuation {
    /// The command id as JSON carries it (`backend:12`, `edge:3`).
    pub command_id: String,
    pub relay: u8,
    /// `on` or `off`.
    pub action: String,
    pub duration_s: u32,
    /// Unix time in milliseconds when the slave switched the relay.
    pub at_ms: u64,
}

/// A slave's actuation log in `dir`: JSON lines, one per relay a command switched.
pub fn actuation_log_path(dir: &Path, master: &DeviceId, mac: MacAddr) -> PathBuf {
    let mac = mac.to_string().replace(':', "");
    dir.join(format!("actuations-{master}-{mac}.jsonl"))
}

/// Appends one line to an actuation log. One `write` per line, so a process killed between two
/// lines leaves whole lines.
pub fn append_actuation(path: &Path, actuation: &Actuation) -> Result<(), SimError> {
    use std::io::Write;
    let error = |e: &dyn std::fmt::Display| SimError::State {
        path: path.into(),
        reason: e.to_string(),
    };
    let mut line = serde_json::to_vec(actuation).map_err(|e| error(&e))?;
    line.push(b'\n');
    let mut file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| error(&e))?;
    file.write_all(&line).map_err(|e| error(&e))
}

/// Every line of an actuation log; a missing log is an empty one.
pub fn read_actuations(path: &Path) -> Result<Vec<Actuation>, SimError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(SimError::State {
                path: path.into(),
                reason: e.to_string(),
            });
        }
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| SimError::State {
                path: path.into(),
                reason: format!("{e} in line {l:?}"),
            })
        })
        .collect()
}

pub fn master_path(dir: &Path, master: &DeviceId) -> PathBuf {
    dir.join(format!("master-{master}.json"))
}

pub fn slave_path(dir: &Path, master: &DeviceId, mac: MacAddr) -> PathBuf {
    let mac = mac.to_string().replace(':', "");
    dir.join(format!("slave-{master}-{mac}.json"))
}

/// The saved value, or the default when there is none yet. A corrupt file is an error: silently
/// forgetting a latch or a counter is exactly what persistence is for.
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T, SimError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SimError::State {
            path: path.into(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(SimError::State {
            path: path.into(),
            reason: e.to_string(),
        }),
    }
}

/// Writes to a temporary file, syncs and renames, so a crash leaves the old or the new state.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), SimError> {
    let error = |e: &dyn std::fmt::Display| SimError::State {
        path: path.into(),
        reason: e.to_string(),
    };
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| error(&e))?;
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp).map_err(|e| error(&e))?;
        file.write_all(&bytes).map_err(|e| error(&e))?;
        file.sync_all().map_err(|e| error(&e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| error(&e))
}
