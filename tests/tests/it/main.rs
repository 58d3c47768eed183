//! End-to-end tests on the real local stack: one binary, one module per area.

mod pgtap;
mod simulator;
