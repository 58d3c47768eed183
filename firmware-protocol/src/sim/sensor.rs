//! Simulated sensors: a fixed value, or a linear ramp from one value to another that then holds
//! (pH drifting from 6.8 to 6.0), parsed from `NAME=VALUE`, `NAME=FROM..TO`, with `@UNIT`.

use std::str::FromStr;

/// Readings a ramp takes to go from its start to its end value.
pub const RAMP_STEPS_DEFAULT: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SensorSource {
    Fixed(f64),
    Ramp { from: f64, to: f64, steps: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SensorSpec {
    pub name: String,
    pub unit: Option<String>,
    pub source: SensorSource,
}

impl SensorSpec {
    /// The value of the `tick`-th reading (0-based).
    pub fn value_at(&self, tick: u64) -> f64 {
        match self.source {
            SensorSource::Fixed(v) => v,
            SensorSource::Ramp { from, to, steps } => {
                let steps = steps.max(1);
                let progress = tick.min(steps) as f64 / steps as f64;
                from + (to - from) * progress
            }
        }
    }
}

/// Units for the sensor names the seeds use, when none is given.
fn default_unit(name: &str) -> Option<&'static str> {
    Some(match name {
        "ph" => "pH",
        "temp" | "temperature" | "water_temp" => "°C",
        "tds" => "ppm",
        "ec" => "mS/cm",
        "humidity" => "%",
        "level" | "water_level" => "%",
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sensor {text:?}: {reason} (expected NAME=VALUE or NAME=FROM..TO, optionally @UNIT)")]
pub struct SensorSpecError {
    pub text: String,
    pub reason: String,
}

impl FromStr for SensorSpec {
    type Err = SensorSpecError;
    fn from_str(text: &str) -> Result<SensorSpec, SensorSpecError> {
        let err = |reason: &str| SensorSpecError {
            text: text.into(),
            reason: reason.into(),
        };
        let (name, rest) = text.split_once('=').ok_or_else(|| err("missing '='"))?;
        let (values, unit) = match rest.split_once('@') {
            Some((v, u)) => (v, Some(u.to_string())),
            None => (rest, default_unit(name).map(str::to_string)),
        };
        let number = |s: &str| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| err("value is not a finite number"))
        };
        let source = match values.split_once("..") {
            Some((from, to)) => SensorSource::Ramp {
                from: number(from)?,
                to: number(to)?,
                steps: RAMP_STEPS_DEFAULT,
            },
            None => SensorSource::Fixed(number(values)?),
        };
        let key_ok = !name.is_empty()
            && name.len() <= crate::message::SENSOR_KEY_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && name != "v"
            && name != "ts_ms";
        if !key_ok {
            return Err(err("name must be 1..=32 of a-z 0-9 _ and not v or ts_ms"));
        }
        Ok(SensorSpec {
            name: name.into(),
            unit,
            source,
        })
    }
}
