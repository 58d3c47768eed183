//! What survives a simulated reboot: the master's replay counter, applied command ids and
//! emergency latch, and each slave's latch, as small JSON files in the state folder.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::mac::MacAddr;
use crate::message::DeviceId;

use super::SimError;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlavePersisted {
    pub emergency_latched: bool,
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
