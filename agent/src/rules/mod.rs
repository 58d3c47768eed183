//! The rule language and the decision engine (filled in by issue 6).
