//! Contract 2 between the agent and ESP32 boards: topics, payloads, frames and signing.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
