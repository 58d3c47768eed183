//! The `esp32-sim` command line, and its translation into a [`SimConfig`].

use std::path::PathBuf;

use clap::Parser;

use super::master::{MasterSpec, MasterTiming};
use super::radio::RadioSpec;
use super::sensor::SensorSpec;
use super::slave::SlaveSpec;
use super::{PollSpec, SimConfig, SimError};
use crate::mac::MacAddr;
use crate::message::{DeviceId, RelayLimits};
use crate::sign::MasterKey;

/// Relays per slave when `--slave MAC` names no count.
pub const RELAYS_PER_SLAVE_DEFAULT: u8 = 4;

/// Simulates ESP32 masters with slave relay boards for AutoCore Edge.
///
/// Each master connects to the MQTT broker, announces itself, publishes telemetry, verifies
/// signed commands, forwards them over a simulated ESP-NOW radio to its slaves and acks them.
/// With --rest-url it also polls get_and_lock_slave_commands like a real master does.
#[derive(Parser)]
#[command(name = "esp32-sim", version)]
pub struct Args {
    /// MQTT broker, mqtt://HOST:PORT. Optional when --rest-url is given.
    #[arg(long, env = "AUTOCORE_MQTT_URL")]
    pub mqtt: Option<String>,

    /// A master's device id (repeatable; each runs with its own slaves and key).
    #[arg(long = "master", value_name = "ID", required = true)]
    pub masters: Vec<DeviceId>,

    /// A slave relay board: MAC[:RELAYS], e.g. 14:33:5C:38:BF:60:4 (repeatable). Prefix with
    /// MASTER= to attach it to one master only; otherwise every master gets it.
    #[arg(long = "slave", value_name = "[MASTER=]MAC[:RELAYS]")]
    pub slaves: Vec<String>,

    /// HMAC-SHA256 key for signed commands, hex (16..64 bytes). MASTER=HEX sets one master's
    /// key; a bare HEX is every other master's key.
    #[arg(
        long = "key",
        value_name = "[MASTER=]HEX",
        env = "AUTOCORE_MASTER_KEY",
        hide_env_values = true
    )]
    pub keys: Vec<String>,

    /// A sensor: NAME=VALUE (fixed) or NAME=FROM..TO (ramp), optional @UNIT, e.g. ph=6.8..6.0
    /// (repeatable; every master reports every sensor).
    #[arg(long = "sensor", value_name = "NAME=VALUE|NAME=FROM..TO[@UNIT]")]
    pub sensors: Vec<SensorSpec>,

    /// Readings a ramp takes from its first to its last value.
    #[arg(long, default_value_t = super::sensor::RAMP_STEPS_DEFAULT)]
    pub ramp_steps: u64,

    /// Telemetry interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,

    /// Master-to-slave heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,

    /// A slave that hears nothing from its master this long switches all relays off.
    #[arg(long, default_value_t = 5000)]
    pub master_silent_timeout_ms: u64,

    /// Every relay's maximum on-time in seconds, enforced by its slave (0: none).
    #[arg(long, default_value_t = 3600)]
    pub relay_max_on_s: u32,

    /// A relay that is on at power-up: MAC:RELAY (repeatable). All others boot off.
    #[arg(long = "boot-on", value_name = "MAC:RELAY")]
    pub boot_on: Vec<String>,

    /// Wait this long for a slave's ack before resending a frame.
    #[arg(long, default_value_t = 200)]
    pub frame_ack_timeout_ms: u64,

    /// Send a command frame at most this many times.
    #[arg(long, default_value_t = 5)]
    pub frame_attempts_max: u32,

    /// Percentage of radio frames lost (0..=100).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub radio_loss_percent: u8,

    /// Delay of every radio frame in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub radio_delay_ms: u64,

    /// Folder that keeps emergency latches, replay counters and applied command ids across
    /// restarts.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,

    /// Folder where each slave appends a JSON line (command id, relay, action, time) for every
    /// relay a command switched.
    #[arg(long)]
    pub actuation_log_dir: Option<PathBuf>,

    /// PostgREST root URL; when set, masters poll {rest_url}/rpc/get_and_lock_slave_commands.
    #[arg(long, env = "AUTOCORE_REST_URL")]
    pub rest_url: Option<String>,

    /// Bearer token for --rest-url.
    #[arg(long, env = "AUTOCORE_JWT", hide_env_values = true)]
    pub jwt: Option<String>,

    /// Poll interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub poll_ms: u64,

    /// p_limit of each poll.
    #[arg(long, default_value_t = 5)]
    pub poll_limit: u32,

    /// p_timeout_seconds of each poll.
    #[arg(long, default_value_t = 30)]
    pub poll_lock_timeout_s: u32,
}

// Written by hand so keys and the token never reach a log through `{:?}`.
impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("mqtt", &self.mqtt)
            .field("masters", &self.masters)
            .field("slaves", &self.slaves)
            .field("keys", &format_args!("<{} redacted>", self.keys.len()))
            .field("sensors", &self.sensors)
            .field("state_dir", &self.state_dir)
            .field("rest_url", &self.rest_url)
            .field("jwt", &self.jwt.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

fn parse_slave(text: &str) -> Result<(Option<DeviceId>, MacAddr, u8), SimError> {
    let bad = |why: &str| SimError::Config(format!("--slave {text:?}: {why}"));
    let (master, rest) = match text.split_once('=') {
        Some((m, r)) => (Some(DeviceId::new(m).map_err(|e| bad(&e.to_string()))?), r),
        None => (None, text),
    };
    // A MAC has five colons; a sixth separates the relay count.
    let (mac, relays) = match rest.match_indices(':').nth(5) {
        Some((i, _)) => (
            &rest[..i],
            rest[i + 1..]
                .parse::<u8>()
                .map_err(|_| bad("relay count is not a number"))?,
        ),
        None => (rest, RELAYS_PER_SLAVE_DEFAULT),
    };
    let mac: MacAddr = mac
        .parse()
        .map_err(|e: crate::mac::MacAddrError| bad(&e.to_string()))?;
    if relays == 0 || relays > crate::frame::RELAYS_PER_SLAVE_MAX {
        return Err(bad("relay count must be 1..=16"));
    }
    Ok((master, mac, relays))
}

impl Args {
    pub fn into_config(self) -> Result<SimConfig, SimError> {
        let mut default_key = None;
        let mut master_keys = std::collections::BTreeMap::new();
        for k in &self.keys {
            match k.split_once('=') {
                Some((m, hex)) => {
                    let id =
                        DeviceId::new(m).map_err(|e| SimError::Config(format!("--key: {e}")))?;
                    let key = MasterKey::from_hex(hex)
                        .map_err(|e| SimError::Config(format!("--key for {id}: {e}")))?;
                    master_keys.insert(id, key);
                }
                None => {
                    default_key = Some(
                        MasterKey::from_hex(k)
                            .map_err(|e| SimError::Config(format!("--key: {e}")))?,
                    );
                }
            }
        }
        let slaves = self
            .slaves
            .iter()
            .map(|s| parse_slave(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut boot_on = Vec::new();
        for b in &self.boot_on {
            let (mac, relay) = b
                .rsplit_once(':')
                .and_then(|(m, r)| Some((m.parse::<MacAddr>().ok()?, r.parse::<u8>().ok()?)))
                .ok_or_else(|| SimError::Config(format!("--boot-on {b:?}: expected MAC:RELAY")))?;
            boot_on.push((mac, relay));
        }
        let sensors: Vec<SensorSpec> = self
            .sensors
            .into_iter()
            .map(|mut s| {
                if let super::sensor::SensorSource::Ramp { steps, .. } = &mut s.source {
                    *steps = self.ramp_steps;
                }
                s
            })
            .collect();
        let mut masters = Vec::new();
        for id in &self.masters {
            let key = match master_keys.get(id).or(default_key.as_ref()) {
                Some(k) => k.clone(),
                None if self.mqtt.is_none() => {
                    // HTTP-only masters never verify MQTT commands; any key will do.
                    MasterKey::from_bytes(&[0u8; 32])
                        .map_err(|e| SimError::Config(e.to_string()))?
                }
                None => return Err(SimError::Config(format!("no --key for master {id}"))),
            };
            let slaves = slaves
                .iter()
                .filter(|(m, _, _)| m.as_ref().is_none_or(|m| m == id))
                .map(|(_, mac, count)| SlaveSpec {
                    mac: *mac,
                    relays: (0..*count)
                        .map(|r| RelayLimits {
                            max_on_s: self.relay_max_on_s,
                            boot_on: boot_on.contains(&(*mac, r)),
                        })
                        .collect(),
                })
                .collect();
            masters.push(MasterSpec {
                id: id.clone(),
                key,
                slaves,
                sensors: sensors.clone(),
            });
        }
        let poll = match (self.rest_url, self.jwt) {
            (Some(rest_url), Some(jwt)) => Some(PollSpec {
                rest_url,
                jwt,
                interval_ms: self.poll_ms,
                limit: self.poll_limit,
                lock_timeout_s: self.poll_lock_timeout_s,
            }),
            (Some(_), None) => return Err(SimError::Config("--rest-url needs --jwt".into())),
            (None, _) => None,
        };
        Ok(SimConfig {
            mqtt_url: self.mqtt,
            masters,
            timing: MasterTiming {
                telemetry_interval_ms: self.interval_ms,
                heartbeat_interval_ms: self.heartbeat_ms,
                master_silent_timeout_ms: self.master_silent_timeout_ms,
                slave_offline_after_ms: self.heartbeat_ms.saturating_mul(3).saturating_add(500),
                frame_ack_timeout_ms: self.frame_ack_timeout_ms,
                frame_attempts_max: self.frame_attempts_max.max(1),
            },
            radio: RadioSpec {
                loss_percent: self.radio_loss_percent,
                delay_ms: self.radio_delay_ms,
            },
            state_dir: self.state_dir,
            actuation_log_dir: self.actuation_log_dir,
            radio_control: None,
            poll,
        })
    }
}
