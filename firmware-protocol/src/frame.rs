//! ESP-NOW frames between a master and its slave relay boards: one fixed 36-byte little-endian
//! layout with a CRC-32 tag; a view over bytes ([`Frame`]) and a parsed form ([`FrameRepr`]).
//!
//! This module allocates nothing and builds without `std`, so the same code can be reasoned
//! about by firmware authors and fuzzed here. Parsing never panics: every check that can fail
//! returns a [`FrameError`] naming the check.
//!
//! Layout (offsets in bytes, integers little-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 2 | magic `"AC"` (0x41 0x43) |
//! | 2 | 1 | version (1) |
//! | 3 | 1 | kind ([`FrameKind`]) |
//! | 4 | 1 | flags (bit 0: sender's emergency stop is latched; other bits 0) |
//! | 5 | 1 | relay number (0..16) |
//! | 6 | 1 | action (0 none, 1 off, 2 on) |
//! | 7 | 1 | status (ack result or report reason, by kind) |
//! | 8 | 4 | sequence number (u32) |
//! | 12 | 8 | command id (u64, see [`crate::CommandId`]; 0 = none) |
//! | 20 | 4 | duration in seconds (u32) |
//! | 24 | 2 | relay states (u16 bitmap, bit n = relay n is on) |
//! | 26 | 1 | relay count (0..=16) |
//! | 27 | 1 | reserved (0) |
//! | 28 | 4 | elapsed time in milliseconds (u32) |
//! | 32 | 4 | CRC-32 (IEEE, as zlib) over bytes 0..32 |

use core::fmt;

/// `"AC"`: AutoCore.
pub const MAGIC: [u8; 2] = *b"AC";
/// The only frame version this codec reads and writes.
pub const VERSION: u8 = 1;
/// Every frame is exactly this long.
pub const FRAME_LEN: usize = 36;
/// ESP-NOW's payload limit; frames stay well under it.
pub const ESPNOW_PAYLOAD_BYTES_MAX: usize = 250;
/// A slave drives at most this many relays (the width of the state bitmap).
pub const RELAYS_PER_SLAVE_MAX: u8 = 16;
/// The longest on-time one command may ask for: one day.
pub const DURATION_S_MAX: u32 = 86_400;

const _: () = assert!(FRAME_LEN <= ESPNOW_PAYLOAD_BYTES_MAX);

mod field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..2;
    pub const VERSION: usize = 2;
    pub const KIND: usize = 3;
    pub const FLAGS: usize = 4;
    pub const RELAY: usize = 5;
    pub const ACTION: usize = 6;
    pub const STATUS: usize = 7;
    pub const SEQUENCE: Range<usize> = 8..12;
    pub const COMMAND_ID: Range<usize> = 12..20;
    pub const DURATION: Range<usize> = 20..24;
    pub const RELAY_STATES: Range<usize> = 24..26;
    pub const RELAY_COUNT: usize = 26;
    pub const RESERVED: usize = 27;
    pub const ELAPSED_MS: Range<usize> = 28..32;
    pub const TAG: Range<usize> = 32..36;
}

const FLAG_EMERGENCY_LATCHED: u8 = 0x01;

/// Why a byte string is not a valid frame. Each variant names the check that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Need more bytes: the buffer is shorter than a frame.
    Truncated {
        needed: usize,
        got: usize,
    },
    /// The buffer is longer than a frame (ESP-NOW delivers whole datagrams, so this is garbage).
    Oversized {
        max: usize,
        got: usize,
    },
    BadMagic {
        got: [u8; 2],
    },
    UnsupportedVersion {
        got: u8,
        supported: u8,
    },
    /// The CRC-32 over bytes 0..32 does not match the tag.
    BadTag {
        computed: u32,
        received: u32,
    },
    UnknownKind(u8),
    UnknownFlags(u8),
    UnknownAction(u8),
    /// The status byte has no meaning for this kind of frame.
    UnknownStatus {
        kind: FrameKind,
        value: u8,
    },
    RelayOutOfRange {
        relay: u8,
        max: u8,
    },
    DurationOutOfRange {
        duration_s: u32,
        max: u32,
    },
    RelayCountOutOfRange {
        count: u8,
        max: u8,
    },
    /// A relay beyond the relay count is reported as on.
    StatesBeyondCount {
        states: u16,
        count: u8,
    },
    /// A relay command needs an action and a command id.
    MissingField(&'static str),
    /// A field this kind of frame does not use is not zero.
    UnusedFieldSet(&'static str),
    /// `emit` was handed a buffer shorter than a frame.
    BufferTooSmall {
        needed: usize,
        got: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Truncated { needed, got } => {
                write!(f, "truncated frame: need {needed} bytes, got {got}")
            }
            FrameError::Oversized { max, got } => {
                write!(f, "oversized frame: at most {max} bytes, got {got}")
            }
            FrameError::BadMagic { got } => {
                write!(f, "bad magic {:02x}{:02x}, expected 4143", got[0], got[1])
            }
            FrameError::UnsupportedVersion { got, supported } => {
                write!(
                    f,
                    "unsupported frame version {got}, this codec speaks {supported}"
                )
            }
            FrameError::BadTag { computed, received } => write!(
                f,
                "integrity tag mismatch: computed crc32 {computed:08x}, frame says {received:08x}"
            ),
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::UnknownFlags(b) => write!(f, "unknown flag bits {b:#04x}"),
            FrameError::UnknownAction(a) => write!(f, "unknown relay action {a}"),
            FrameError::UnknownStatus { kind, value } => {
                write!(f, "status {value} means nothing for a {kind:?} frame")
            }
            FrameError::RelayOutOfRange { relay, max } => {
                write!(
                    f,
                    "relay {relay} out of range, slaves have fewer than {max}"
                )
            }
            FrameError::DurationOutOfRange { duration_s, max } => {
                write!(f, "duration {duration_s} s out of range, at most {max} s")
            }
            FrameError::RelayCountOutOfRange { count, max } => {
                write!(f, "relay count {count} out of range, at most {max}")
            }
            FrameError::StatesBeyondCount { states, count } => write!(
                f,
                "relay states {states:#06x} mark relays beyond the relay count {count} as on"
            ),
            FrameError::MissingField(name) => write!(f, "field {name} must be set"),
            FrameError::UnusedFieldSet(name) => {
                write!(
                    f,
                    "field {name} is unused by this frame kind and must be zero"
                )
            }
            FrameError::BufferTooSmall { needed, got } => {
                write!(
                    f,
                    "buffer too small to emit a frame: need {needed}, got {got}"
                )
            }
        }
    }
}

impl core::error::Error for FrameError {}

impl FrameError {
    /// A stable snake_case name of the failed check, as used in the test vectors.
    pub fn check_name(&self) -> &'static str {
        match self {
            FrameError::Truncated { .. } => "truncated",
            FrameError::Oversized { .. } => "oversized",
            FrameError::BadMagic { .. } => "bad_magic",
            FrameError::UnsupportedVersion { .. } => "unsupported_version",
            FrameError::BadTag { .. } => "bad_tag",
            FrameError::UnknownKind(_) => "unknown_kind",
            FrameError::UnknownFlags(_) => "unknown_flags",
            FrameError::UnknownAction(_) => "unknown_action",
            FrameError::UnknownStatus { .. } => "unknown_status",
            FrameError::RelayOutOfRange { .. } => "relay_out_of_range",
            FrameError::DurationOutOfRange { .. } => "duration_out_of_range",
            FrameError::RelayCountOutOfRange { .. } => "relay_count_out_of_range",
            FrameError::StatesBeyondCount { .. } => "states_beyond_count",
            FrameError::MissingField(_) => "missing_field",
            FrameError::UnusedFieldSet(_) => "unused_field_set",
            FrameError::BufferTooSmall { .. } => "buffer_too_small",
        }
    }
}

/// CRC-32 as zlib and `esp_rom_crc32_le` compute it (reflected polynomial 0xEDB88320, initial
/// value and final xor 0xFFFFFFFF). Bitwise rather than table-driven: 32 bytes per frame does
/// not justify a 1 KiB table on a slave.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Master to slave: set one relay.
    RelayCommand = 1,
    /// Slave to master: the result of a relay command.
    Ack = 2,
    /// Slave to master: relay states, in answer to a heartbeat or after a change it made itself.
    StateReport = 3,
    /// Master to slave: "I am here"; carries the master's emergency latch in the flags.
    Heartbeat = 4,
    /// Slave to master: asks to be paired, with its relay count.
    PairingRequest = 5,
    /// Master to slave: pairing accepted.
    PairingAccept = 6,
    /// Master to slave: all relays off now, and latch.
    EmergencyStop = 7,
    /// Master to slave: release the latch (relays stay off).
    EmergencyReset = 8,
}

impl FrameKind {
    pub fn from_u8(value: u8) -> Result<FrameKind, FrameError> {
        Ok(match value {
            1 => FrameKind::RelayCommand,
            2 => FrameKind::Ack,
            3 => FrameKind::StateReport,
            4 => FrameKind::Heartbeat,
            5 => FrameKind::PairingRequest,
            6 => FrameKind::PairingAccept,
            7 => FrameKind::EmergencyStop,
            8 => FrameKind::EmergencyReset,
            other => return Err(FrameError::UnknownKind(other)),
        })
    }
}

/// An absolute relay action; there is no toggle, so a repeated frame does no harm. In JSON:
/// `"on"` / `"off"`, as in `relay_commands_slave.actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "std",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum SwitchAction {
    Off = 1,
    On = 2,
}

/// The result a slave reports in an [`FrameKind::Ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// The relay was set as asked.
    Applied = 0,
    /// This command id was already applied to this relay; nothing changed.
    Duplicate = 1,
    /// Refused: the emergency stop is latched (switching off is still applied).
    EmergencyLatched = 2,
    /// Refused: the slave has no such relay.
    NoSuchRelay = 3,
}

impl AckCode {
    fn from_u8(value: u8) -> Result<AckCode, FrameError> {
        Ok(match value {
            0 => AckCode::Applied,
            1 => AckCode::Duplicate,
            2 => AckCode::EmergencyLatched,
            3 => AckCode::NoSuchRelay,
            other => {
                return Err(FrameError::UnknownStatus {
                    kind: FrameKind::Ack,
                    value: other,
                });
            }
        })
    }
}

/// Why a slave sends a [`FrameKind::StateReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReportReason {
    /// In answer to a heartbeat.
    Heartbeat = 0,
    /// First report after power-up, with the configured boot states applied.
    Boot = 1,
    /// The master was silent too long; the slave switched everything off. Sent once, when
    /// contact returns.
    MasterSilent = 2,
    /// A relay reached its maximum on-time and the slave switched it off.
    MaxOnTime = 3,
    /// A commanded duration ended and the slave switched the relay off.
    DurationEnded = 4,
    /// The emergency stop switched everything off.
    EmergencyStop = 5,
}

impl ReportReason {
    fn from_u8(value: u8) -> Result<ReportReason, FrameError> {
        Ok(match value {
            0 => ReportReason::Heartbeat,
            1 => ReportReason::Boot,
            2 => ReportReason::MasterSilent,
            3 => ReportReason::MaxOnTime,
            4 => ReportReason::DurationEnded,
            5 => ReportReason::EmergencyStop,
            other => {
                return Err(FrameError::UnknownStatus {
                    kind: FrameKind::StateReport,
                    value: other,
                });
            }
        })
    }
}

/// Relay states of one slave: bit n is relay n, `count` relays exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RelayStates {
    pub bits: u16,
    pub count: u8,
}

impl RelayStates {
    pub fn is_on(&self, relay: u8) -> bool {
        relay < self.count && relay < 16 && self.bits & (1 << relay) != 0
    }

    fn check(&self) -> Result<(), FrameError> {
        if self.count > RELAYS_PER_SLAVE_MAX {
            return Err(FrameError::RelayCountOutOfRange {
                count: self.count,
                max: RELAYS_PER_SLAVE_MAX,
            });
        }
        let allowed = if self.count >= 16 {
            u16::MAX
        } else {
            (1u16 << self.count) - 1
        };
        if self.bits & !allowed != 0 {
            return Err(FrameError::StatesBeyondCount {
                states: self.bits,
                count: self.count,
            });
        }
        Ok(())
    }
}

/// A read-only or writable view over the bytes of one frame, with field accessors. The
/// accessors index the buffer directly, so build the view with [`Frame::new_checked`] before
/// reading a buffer of unknown length.
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    pub const fn new_unchecked(buffer: T) -> Frame<T> {
        Frame { buffer }
    }

    /// A view after [`Frame::check_len`].
    pub fn new_checked(buffer: T) -> Result<Frame<T>, FrameError> {
        let frame = Frame::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// The buffer is exactly one frame long.
    pub fn check_len(&self) -> Result<(), FrameError> {
        let got = self.buffer.as_ref().len();
        if got < FRAME_LEN {
            Err(FrameError::Truncated {
                needed: FRAME_LEN,
                got,
            })
        } else if got > FRAME_LEN {
            Err(FrameError::Oversized {
                max: FRAME_LEN,
                got,
            })
        } else {
            Ok(())
        }
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    fn u32_at(&self, range: core::ops::Range<usize>) -> u32 {
        let b = &self.bytes()[range];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    pub fn magic(&self) -> [u8; 2] {
        let b = &self.bytes()[field::MAGIC];
        [b[0], b[1]]
    }
    pub fn version(&self) -> u8 {
        self.bytes()[field::VERSION]
    }
    pub fn kind_raw(&self) -> u8 {
        self.bytes()[field::KIND]
    }
    pub fn flags(&self) -> u8 {
        self.bytes()[field::FLAGS]
    }
    pub fn relay(&self) -> u8 {
        self.bytes()[field::RELAY]
    }
    pub fn action_raw(&self) -> u8 {
        self.bytes()[field::ACTION]
    }
    pub fn status_raw(&self) -> u8 {
        self.bytes()[field::STATUS]
    }
    pub fn sequence(&self) -> u32 {
        self.u32_at(field::SEQUENCE)
    }
    pub fn command_id(&self) -> u64 {
        let b = &self.bytes()[field::COMMAND_ID];
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    pub fn duration_s(&self) -> u32 {
        self.u32_at(field::DURATION)
    }
    pub fn relay_states(&self) -> u16 {
        let b = &self.bytes()[field::RELAY_STATES];
        u16::from_le_bytes([b[0], b[1]])
    }
    pub fn relay_count(&self) -> u8 {
        self.bytes()[field::RELAY_COUNT]
    }
    pub fn reserved(&self) -> u8 {
        self.bytes()[field::RESERVED]
    }
    pub fn elapsed_ms(&self) -> u32 {
        self.u32_at(field::ELAPSED_MS)
    }
    pub fn tag(&self) -> u32 {
        self.u32_at(field::TAG)
    }

    /// The CRC-32 the tag should hold.
    pub fn compute_tag(&self) -> u32 {
        crc32(&self.bytes()[..field::TAG.start])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    fn set_u32_at(&mut self, range: core::ops::Range<usize>, value: u32) {
        self.bytes_mut()[range].copy_from_slice(&value.to_le_bytes());
    }
    pub fn set_magic(&mut self) {
        self.bytes_mut()[field::MAGIC].copy_from_slice(&MAGIC);
    }
    pub fn set_version(&mut self, value: u8) {
        self.bytes_mut()[field::VERSION] = value;
    }
    pub fn set_kind_raw(&mut self, value: u8) {
        self.bytes_mut()[field::KIND] = value;
    }
    pub fn set_flags(&mut self, value: u8) {
        self.bytes_mut()[field::FLAGS] = value;
    }
    pub fn set_relay(&mut self, value: u8) {
        self.bytes_mut()[field::RELAY] = value;
    }
    pub fn set_action_raw(&mut self, value: u8) {
        self.bytes_mut()[field::ACTION] = value;
    }
    pub fn set_status_raw(&mut self, value: u8) {
        self.bytes_mut()[field::STATUS] = value;
    }
    pub fn set_sequence(&mut self, value: u32) {
        self.set_u32_at(field::SEQUENCE, value);
    }
    pub fn set_command_id(&mut self, value: u64) {
        self.bytes_mut()[field::COMMAND_ID].copy_from_slice(&value.to_le_bytes());
    }
    pub fn set_duration_s(&mut self, value: u32) {
        self.set_u32_at(field::DURATION, value);
    }
    pub fn set_relay_states(&mut self, value: u16) {
        self.bytes_mut()[field::RELAY_STATES].copy_from_slice(&value.to_le_bytes());
    }
    pub fn set_relay_count(&mut self, value: u8) {
        self.bytes_mut()[field::RELAY_COUNT] = value;
    }
    pub fn set_reserved(&mut self, value: u8) {
        self.bytes_mut()[field::RESERVED] = value;
    }
    pub fn set_elapsed_ms(&mut self, value: u32) {
        self.set_u32_at(field::ELAPSED_MS, value);
    }
    /// Writes the CRC-32 of bytes 0..32 into the tag; call it last.
    pub fn fill_tag(&mut self) {
        let tag = self.compute_tag();
        self.set_u32_at(field::TAG, tag);
    }
}

/// What a frame says, by kind; fields a kind does not carry are zero on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameBody {
    RelayCommand {
        command_id: u64,
        relay: u8,
        action: SwitchAction,
        /// 0 with `On`: no duration asked; the slave's maximum on-time still applies.
        duration_s: u32,
    },
    Ack {
        command_id: u64,
        relay: u8,
        code: AckCode,
        states: RelayStates,
        /// From receiving the command to the relay having switched.
        elapsed_ms: u32,
    },
    StateReport {
        reason: ReportReason,
        states: RelayStates,
    },
    Heartbeat,
    PairingRequest {
        relay_count: u8,
    },
    PairingAccept,
    EmergencyStop,
    EmergencyReset,
}

impl FrameBody {
    pub fn kind(&self) -> FrameKind {
        match self {
            FrameBody::RelayCommand { .. } => FrameKind::RelayCommand,
            FrameBody::Ack { .. } => FrameKind::Ack,
            FrameBody::StateReport { .. } => FrameKind::StateReport,
            FrameBody::Heartbeat => FrameKind::Heartbeat,
            FrameBody::PairingRequest { .. } => FrameKind::PairingRequest,
            FrameBody::PairingAccept => FrameKind::PairingAccept,
            FrameBody::EmergencyStop => FrameKind::EmergencyStop,
            FrameBody::EmergencyReset => FrameKind::EmergencyReset,
        }
    }
}

/// A parsed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameRepr {
    /// Chosen by the sender, incremented per frame; a reply repeats the request's sequence.
    pub sequence: u32,
    /// The sender's emergency stop is latched.
    pub emergency_latched: bool,
    pub body: FrameBody,
}

/// The fields as they sit in the frame, before or after the per-kind meaning is applied.
#[derive(Default, PartialEq, Eq)]
struct RawFields {
    relay: u8,
    action: u8,
    status: u8,
    command_id: u64,
    duration_s: u32,
    relay_states: u16,
    relay_count: u8,
    elapsed_ms: u32,
}

impl FrameRepr {
    /// Reads and checks a frame: length, magic, version, tag, then every field's range. Never
    /// panics, whatever the bytes.
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<FrameRepr, FrameError> {
        frame.check_len()?;
        if frame.magic() != MAGIC {
            return Err(FrameError::BadMagic { got: frame.magic() });
        }
        if frame.version() != VERSION {
            return Err(FrameError::UnsupportedVersion {
                got: frame.version(),
                supported: VERSION,
            });
        }
        let computed = frame.compute_tag();
        if computed != frame.tag() {
            return Err(FrameError::BadTag {
                computed,
                received: frame.tag(),
            });
        }
        let kind = FrameKind::from_u8(frame.kind_raw())?;
        let flags = frame.flags();
        if flags & !FLAG_EMERGENCY_LATCHED != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        if frame.reserved() != 0 {
            return Err(FrameError::UnusedFieldSet("reserved"));
        }
        let raw = RawFields {
            relay: frame.relay(),
            action: frame.action_raw(),
            status: frame.status_raw(),
            command_id: frame.command_id(),
            duration_s: frame.duration_s(),
            relay_states: frame.relay_states(),
            relay_count: frame.relay_count(),
            elapsed_ms: frame.elapsed_ms(),
        };
        let states = RelayStates {
            bits: raw.relay_states,
            count: raw.relay_count,
        };
        let body = match kind {
            FrameKind::RelayCommand => {
                let action = match raw.action {
                    0 => return Err(FrameError::MissingField("action")),
                    1 => SwitchAction::Off,
                    2 => SwitchAction::On,
                    other => return Err(FrameError::UnknownAction(other)),
                };
                FrameBody::RelayCommand {
                    command_id: raw.command_id,
                    relay: raw.relay,
                    action,
                    duration_s: raw.duration_s,
                }
            }
            FrameKind::Ack => FrameBody::Ack {
                command_id: raw.command_id,
                relay: raw.relay,
                code: AckCode::from_u8(raw.status)?,
                states,
                elapsed_ms: raw.elapsed_ms,
            },
            FrameKind::StateReport => FrameBody::StateReport {
                reason: ReportReason::from_u8(raw.status)?,
                states,
            },
            FrameKind::Heartbeat => FrameBody::Heartbeat,
            FrameKind::PairingRequest => FrameBody::PairingRequest {
                relay_count: raw.relay_count,
            },
            FrameKind::PairingAccept => FrameBody::PairingAccept,
            FrameKind::EmergencyStop => FrameBody::EmergencyStop,
            FrameKind::EmergencyReset => FrameBody::EmergencyReset,
        };
        let repr = FrameRepr {
            sequence: frame.sequence(),
            emergency_latched: flags & FLAG_EMERGENCY_LATCHED != 0,
            body,
        };
        repr.check()?;
        // A field the kind does not carry must be zero: compare with what `emit` would write.
        let expected = repr.raw_fields();
        if let Some(name) = first_difference(&raw, &expected) {
            return Err(FrameError::UnusedFieldSet(name));
        }
        Ok(repr)
    }

    /// Range checks shared by `parse` and `emit`.
    pub fn check(&self) -> Result<(), FrameError> {
        match self.body {
            FrameBody::RelayCommand {
                command_id,
                relay,
                duration_s,
                ..
            } => {
                if command_id == 0 {
                    return Err(FrameError::MissingField("command_id"));
                }
                check_relay(relay)?;
                if duration_s > DURATION_S_MAX {
                    return Err(FrameError::DurationOutOfRange {
                        duration_s,
                        max: DURATION_S_MAX,
                    });
                }
            }
            FrameBody::Ack {
                command_id,
                relay,
                states,
                ..
            } => {
                if command_id == 0 {
                    return Err(FrameError::MissingField("command_id"));
                }
                check_relay(relay)?;
                states.check()?;
            }
            FrameBody::StateReport { states, .. } => states.check()?,
            FrameBody::PairingRequest { relay_count } => RelayStates {
                bits: 0,
                count: relay_count,
            }
            .check()?,
            FrameBody::Heartbeat
            | FrameBody::PairingAccept
            | FrameBody::EmergencyStop
            | FrameBody::EmergencyReset => {}
        }
        Ok(())
    }

    /// Always [`FRAME_LEN`].
    pub const fn buffer_len(&self) -> usize {
        FRAME_LEN
    }

    fn raw_fields(&self) -> RawFields {
        let mut raw = RawFields::default();
        match self.body {
            FrameBody::RelayCommand {
                command_id,
                relay,
                action,
                duration_s,
            } => {
                raw.command_id = command_id;
                raw.relay = relay;
                raw.action = action as u8;
                raw.duration_s = duration_s;
            }
            FrameBody::Ack {
                command_id,
                relay,
                code,
                states,
                elapsed_ms,
            } => {
                raw.command_id = command_id;
                raw.relay = relay;
                raw.status = code as u8;
                raw.relay_states = states.bits;
                raw.relay_count = states.count;
                raw.elapsed_ms = elapsed_ms;
            }
            FrameBody::StateReport { reason, states } => {
                raw.status = reason as u8;
                raw.relay_states = states.bits;
                raw.relay_count = states.count;
            }
            FrameBody::PairingRequest { relay_count } => raw.relay_count = relay_count,
            FrameBody::Heartbeat
            | FrameBody::PairingAccept
            | FrameBody::EmergencyStop
            | FrameBody::EmergencyReset => {}
        }
        raw
    }

    /// Writes the frame, tag last. The buffer must be at least [`FRAME_LEN`] long; only its
    /// first [`FRAME_LEN`] bytes are written.
    pub fn emit(&self, buffer: &mut [u8]) -> Result<(), FrameError> {
        self.check()?;
        if buffer.len() < FRAME_LEN {
            return Err(FrameError::BufferTooSmall {
                needed: FRAME_LEN,
                got: buffer.len(),
            });
        }
        let raw = self.raw_fields();
        let mut frame = Frame::new_unchecked(&mut buffer[..FRAME_LEN]);
        frame.set_magic();
        frame.set_version(VERSION);
        frame.set_kind_raw(self.body.kind() as u8);
        frame.set_flags(if self.emergency_latched {
            FLAG_EMERGENCY_LATCHED
        } else {
            0
        });
        frame.set_relay(raw.relay);
        frame.set_action_raw(raw.action);
        frame.set_status_raw(raw.status);
        frame.set_sequence(self.sequence);
        frame.set_command_id(raw.command_id);
        frame.set_duration_s(raw.duration_s);
        frame.set_relay_states(raw.relay_states);
        frame.set_relay_count(raw.relay_count);
        frame.set_reserved(0);
        frame.set_elapsed_ms(raw.elapsed_ms);
        frame.fill_tag();
        Ok(())
    }

    /// `emit` into a fresh array.
    pub fn to_bytes(&self) -> Result<[u8; FRAME_LEN], FrameError> {
        let mut bytes = [0u8; FRAME_LEN];
        self.emit(&mut bytes)?;
        Ok(bytes)
    }

    /// `parse` straight from bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<FrameRepr, FrameError> {
        FrameRepr::parse(&Frame::new_checked(bytes)?)
    }
}

fn check_relay(relay: u8) -> Result<(), FrameError> {
    if relay >= RELAYS_PER_SLAVE_MAX {
        return Err(FrameError::RelayOutOfRange {
            relay,
            max: RELAYS_PER_SLAVE_MAX,
        });
    }
    Ok(())
}

fn first_difference(got: &RawFields, expected: &RawFields) -> Option<&'static str> {
    if got.relay != expected.relay {
        Some("relay")
    } else if got.action != expected.action {
        Some("action")
    } else if got.status != expected.status {
        Some("status")
    } else if got.command_id != expected.command_id {
        Some("command_id")
    } else if got.duration_s != expected.duration_s {
        Some("duration_s")
    } else if got.relay_states != expected.relay_states {
        Some("relay_states")
    } else if got.relay_count != expected.relay_count {
        Some("relay_count")
    } else if got.elapsed_ms != expected.elapsed_ms {
        Some("elapsed_ms")
    } else {
        None
    }
}
