//! End-to-end tests on the real local stack.
