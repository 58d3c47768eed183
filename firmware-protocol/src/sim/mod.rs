//! The ESP32 master/slave simulator.
