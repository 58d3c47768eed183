//! Tests of the protocol crate: one binary, one module per area.

mod cli;
mod fixtures;
mod frame;
mod message;
mod sign;
mod sim;
mod topic;
mod vectors;
