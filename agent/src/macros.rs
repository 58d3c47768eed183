//! Macros: ordered relay, delay, MQTT and nested-macro steps (filled in by issue 6).
