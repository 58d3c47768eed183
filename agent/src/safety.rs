//! Interlocks and the emergency stop (filled in by issue 6).
