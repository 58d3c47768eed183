//! The command id every hop repeats: one u64 that holds either a backend row id or an id the
//! Pi made up for a rule-created command, so a frame can carry both in eight bytes.

use core::fmt;
use core::str::FromStr;

/// Bit 63 marks an id the edge (the Pi) generated. Backend ids are positive `bigint`s
/// (`relay_commands_slave.id`), so they never have it set.
const EDGE_BIT: u64 = 1 << 63;

/// Where a command id comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommandOrigin {
    /// `relay_commands_slave.id` in the backend (1..=i64::MAX).
    Backend,
    /// Generated on the Pi for a command a local rule created (1..2^63).
    Edge,
}

/// A command id. On the wire in frames and in signed bytes it is the raw u64: backend ids as
/// they are, edge ids with bit 63 set; 0 means "no command". In JSON it is a string,
/// `"backend:123"` or `"edge:42"`, because JSON numbers above 2^53 lose precision in many
/// parsers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId(u64);

/// Why a value is not a command id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandIdError {
    /// Zero is reserved for "no command".
    Zero,
    /// Backend ids are positive `bigint`s.
    BackendOutOfRange(i64),
    /// Edge numbers must be below 2^63.
    EdgeOutOfRange(u64),
    /// The text is not `backend:<n>` or `edge:<n>`.
    Syntax,
}

impl fmt::Display for CommandIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandIdError::Zero => write!(f, "command id 0 is reserved for \"no command\""),
            CommandIdError::BackendOutOfRange(n) => {
                write!(
                    f,
                    "backend command id {n} out of range 1..=9223372036854775807"
                )
            }
            CommandIdError::EdgeOutOfRange(n) => {
                write!(f, "edge command number {n} out of range 1..2^63")
            }
            CommandIdError::Syntax => {
                write!(
                    f,
                    "command id must look like \"backend:<n>\" or \"edge:<n>\""
                )
            }
        }
    }
}

impl core::error::Error for CommandIdError {}

impl CommandId {
    /// A backend row id (`relay_commands_slave.id`).
    pub fn backend(id: i64) -> Result<CommandId, CommandIdError> {
        if id <= 0 {
            return Err(CommandIdError::BackendOutOfRange(id));
        }
        Ok(CommandId(id as u64))
    }

    /// An id the edge generated; `number` must be in 1..2^63.
    pub fn edge(number: u64) -> Result<CommandId, CommandIdError> {
        if number == 0 || number & EDGE_BIT != 0 {
            return Err(CommandIdError::EdgeOutOfRange(number));
        }
        Ok(CommandId(number | EDGE_BIT))
    }

    /// From the eight bytes of a frame or of signed bytes.
    pub fn from_raw(raw: u64) -> Result<CommandId, CommandIdError> {
        if raw == 0 || raw == EDGE_BIT {
            return Err(CommandIdError::Zero);
        }
        Ok(CommandId(raw))
    }

    pub fn to_raw(self) -> u64 {
        self.0
    }

    pub fn origin(self) -> CommandOrigin {
        if self.0 & EDGE_BIT != 0 {
            CommandOrigin::Edge
        } else {
            CommandOrigin::Backend
        }
    }

    /// The number without the origin bit.
    pub fn number(self) -> u64 {
        self.0 & !EDGE_BIT
    }

    /// From a `relay_commands_slave` row's `id`: positive is a backend row; negative is a
    /// command the Pi created, as the Pi's local API serves it (`edge:<-id>`); 0 is refused.
    pub fn from_row_id(id: i64) -> Result<CommandId, CommandIdError> {
        match id {
            0 => Err(CommandIdError::Zero),
            id if id > 0 => CommandId::backend(id),
            id => CommandId::edge(id.unsigned_abs()),
        }
    }

    /// The inverse of [`CommandId::from_row_id`]: the `id` a row carries for this command.
    pub fn row_id(self) -> i64 {
        match self.origin() {
            CommandOrigin::Backend => self.0 as i64,
            CommandOrigin::Edge => -(self.number() as i64),
        }
    }

    /// The backend row id, if this is one.
    pub fn backend_id(self) -> Option<i64> {
        match self.origin() {
            CommandOrigin::Backend => Some(self.0 as i64),
            CommandOrigin::Edge => None,
        }
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.origin() {
            CommandOrigin::Backend => write!(f, "backend:{}", self.number()),
            CommandOrigin::Edge => write!(f, "edge:{}", self.number()),
        }
    }
}

impl FromStr for CommandId {
    type Err = CommandIdError;
    fn from_str(s: &str) -> Result<CommandId, CommandIdError> {
        let (origin, number) = s.split_once(':').ok_or(CommandIdError::Syntax)?;
        // u64's parser accepts a leading '+'; a canonical form has one spelling only.
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CommandIdError::Syntax);
        }
        match origin {
            "backend" => {
                let n: i64 = number
                    .parse()
                    .map_err(|_| CommandIdError::BackendOutOfRange(i64::MAX))?;
                CommandId::backend(n)
            }
            "edge" => {
                let n: u64 = number
                    .parse()
                    .map_err(|_| CommandIdError::EdgeOutOfRange(u64::MAX))?;
                CommandId::edge(n)
            }
            _ => Err(CommandIdError::Syntax),
        }
    }
}

#[cfg(feature = "std")]
impl serde::Serialize for CommandId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(feature = "std")]
impl<'de> serde::Deserialize<'de> for CommandId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<CommandId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
