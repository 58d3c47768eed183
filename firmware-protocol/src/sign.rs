//! Signing of relay commands to a master: HMAC-SHA256 under the master's key over a canonical
//! byte string (never over JSON, which two implementations may serialize differently), with a
//! strictly increasing counter against replay.
//!
//! Signed bytes, in order (integers little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 19 | ASCII `autocore/command/v1` (domain and protocol version) |
//! | 1 | length L of `master_id` |
//! | L | `master_id`, ASCII |
//! | 8 | `counter` u64 |
//! | 8 | `command_id`, raw u64 ([`crate::CommandId::to_raw`]) |
//! | 8 | `expires_at_ms` u64 |
//! | 6 | `slave_mac` |
//! | 1 | number N of actions |
//! | N × 6 | per action: relay u8, action u8 (1 off, 2 on), `duration_s` u32 |

use std::fmt;

use ring::hmac;

use crate::message::{DeviceId, RelayCommand};

/// The first bytes of every signed string.
pub const SIGNING_DOMAIN: &[u8] = b"autocore/command/v1";
pub const KEY_BYTES_MIN: usize = 16;
pub const KEY_BYTES_MAX: usize = 64;

/// A master's HMAC key. Its `Debug` prints nothing secret, and it offers no way to read the
/// key back, so it cannot end up in a log by accident.
#[derive(Clone)]
pub struct MasterKey {
    key: hmac::Key,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is {len} bytes, need {KEY_BYTES_MIN}..={KEY_BYTES_MAX}")]
    Length { len: usize },
    /// The text itself is not repeated: it may be most of a key.
    #[error("key is not hex")]
    NotHex,
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<MasterKey, KeyError> {
        if !(KEY_BYTES_MIN..=KEY_BYTES_MAX).contains(&bytes.len()) {
            return Err(KeyError::Length { len: bytes.len() });
        }
        Ok(MasterKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    pub fn from_hex(text: &str) -> Result<MasterKey, KeyError> {
        let bytes = hex::decode(text.trim()).map_err(|_| KeyError::NotHex)?;
        MasterKey::from_bytes(&bytes)
    }
}

impl std::str::FromStr for MasterKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<MasterKey, KeyError> {
        MasterKey::from_hex(s)
    }
}

/// The exact bytes the signature covers (see the module docs). `sig` itself is not part of it.
pub fn signing_bytes(command: &RelayCommand) -> Vec<u8> {
    let master = command.master_id.as_str().as_bytes();
    let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + 1 + master.len() + 31 + 6 * 16);
    out.extend_from_slice(SIGNING_DOMAIN);
    // DeviceId guarantees at most 64 bytes, so the length fits a byte.
    out.push(master.len() as u8);
    out.extend_from_slice(master);
    out.extend_from_slice(&command.counter.to_le_bytes());
    out.extend_from_slice(&command.command_id.to_raw().to_le_bytes());
    out.extend_from_slice(&command.expires_at_ms.to_le_bytes());
    out.extend_from_slice(&command.slave_mac.0);
    // Validation limits actions to 16; a longer list would be rejected before signing.
    out.push(command.actions.len().min(255) as u8);
    for action in &command.actions {
        out.push(action.relay);
        out.push(action.action as u8);
        out.extend_from_slice(&action.duration_s.to_le_bytes());
    }
    out
}

/// HMAC-SHA256 of [`signing_bytes`], lowercase hex.
pub fn signature_hex(command: &RelayCommand, key: &MasterKey) -> String {
    hex::encode(hmac::sign(&key.key, &signing_bytes(command)).as_ref())
}

/// Why a master refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("command is unsigned")]
    Unsigned,
    #[error("signature is not 64 hex digits")]
    MalformedSignature,
    #[error("signature does not match (wrong key or changed content)")]
    BadSignature,
    #[error("command is for master {got}, this is {expected}")]
    WrongMaster { expected: DeviceId, got: DeviceId },
    #[error("counter {counter} is not above the last accepted {last}: replayed or stale")]
    Replayed { counter: u64, last: u64 },
}

impl VerifyError {
    /// A stable snake_case name, as used in the test vectors and in acks.
    pub fn check_name(&self) -> &'static str {
        match self {
            VerifyError::Unsigned => "unsigned",
            VerifyError::MalformedSignature => "malformed_signature",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::WrongMaster { .. } => "wrong_master",
            VerifyError::Replayed { .. } => "replayed",
        }
    }
}

/// The master's side: checks signatures and keeps the replay counter. Persist
/// [`CommandVerifier::last_counter`] across restarts, or a replay of an old command would be
/// accepted after a reboot.
#[derive(Debug, Clone)]
pub struct CommandVerifier {
    master_id: DeviceId,
    key: MasterKey,
    last_counter: Option<u64>,
}

impl CommandVerifier {
    pub fn new(master_id: DeviceId, key: MasterKey, last_counter: Option<u64>) -> CommandVerifier {
        CommandVerifier {
            master_id,
            key,
            last_counter,
        }
    }

    pub fn last_counter(&self) -> Option<u64> {
        self.last_counter
    }

    /// Checks signature, master and counter; on success the counter becomes the last accepted.
    /// The signature is checked first, so a forged counter can never advance the state.
    pub fn verify(&mut self, command: &RelayCommand) -> Result<(), VerifyError> {
        let sig = command.sig.as_deref().ok_or(VerifyError::Unsigned)?;
        let sig = hex::decode(sig).map_err(|_| VerifyError::MalformedSignature)?;
        if sig.len() != 32 {
            return Err(VerifyError::MalformedSignature);
        }
        hmac::verify(&self.key.key, &signing_bytes(command), &sig)
            .map_err(|_| VerifyError::BadSignature)?;
        if command.master_id != self.master_id {
            return Err(VerifyError::WrongMaster {
                expected: self.master_id.clone(),
                got: command.master_id.clone(),
            });
        }
        if let Some(last) = self.last_counter
            && command.counter <= last
        {
            return Err(VerifyError::Replayed {
                counter: command.counter,
                last,
            });
        }
        self.last_counter = Some(command.counter);
        Ok(())
    }
}

/// The agent's side: assigns counters and signs. Start `next_counter` above anything used
/// before (persist it, or start from the current Unix time in milliseconds, which only grows).
#[derive(Debug, Clone)]
pub struct CommandSigner {
    key: MasterKey,
    next_counter: u64,
}

impl CommandSigner {
    pub fn new(key: MasterKey, next_counter: u64) -> CommandSigner {
        CommandSigner { key, next_counter }
    }

    pub fn next_counter(&self) -> u64 {
        self.next_counter
    }

    /// Gives the command the next counter and its signature.
    pub fn seal(&mut self, mut command: RelayCommand) -> RelayCommand {
        command.counter = self.next_counter;
        self.next_counter = self.next_counter.saturating_add(1);
        command.sig = Some(signature_hex(&command, &self.key));
        command
    }
}
