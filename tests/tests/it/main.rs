//! End-to-end tests on the real local stack: one binary, one module per area.

mod agent_crash;
mod agent_flow;
mod agent_local_api;
mod agent_rules;
mod agent_surfaces;
mod agent_sync;
mod broker;
mod cloud_side;
mod command_queue;
mod console;
mod doctor;
mod edge_functions;
mod faults;
mod harness;
mod notify;
mod pgtap;
mod provision;
mod reports;
mod roles;
mod simulator;
mod support;
mod telemetry_counts;
