//! Contract 2 between the agent and ESP32 boards: topics, payloads, frames and signing.
//!
//! Without the `std` feature only [`frame`] and [`command_id`] build (no heap, no_std), which is
//! what firmware-side code would share. With `std` (default): JSON payloads ([`message`]),
//! topics ([`topic`]), command signing ([`sign`]) and test vectors ([`vectors`]). With `sim`
//! (default): the ESP32 master/slave simulator ([`sim`]).
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

pub mod command_id;
pub mod frame;

#[cfg(feature = "std")]
pub mod mac;
#[cfg(feature = "std")]
pub mod message;
#[cfg(feature = "std")]
pub mod sign;
#[cfg(feature = "std")]
pub mod topic;
#[cfg(feature = "std")]
pub mod vectors;

#[cfg(feature = "sim")]
pub mod sim;

pub use command_id::{CommandId, CommandOrigin};
pub use frame::{FrameBody, FrameError, FrameRepr};
#[cfg(feature = "std")]
pub use mac::MacAddr;
#[cfg(feature = "std")]
pub use message::{DecodeError, DeviceId, EncodeError, PROTOCOL_VERSION, Payload};
#[cfg(feature = "std")]
pub use sign::{
    CommandSigner, CommandVerifier, MasterKey, ReplayWindow, ReportSigner, ReportVerifier,
    VerifyError, broker_password,
};
#[cfg(feature = "std")]
pub use topic::{Qos, Topic, TopicError};
