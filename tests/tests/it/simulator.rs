//! The ESP32 simulator against a real Mosquitto.
