//! The MQTT side of the agent: connection options (last will, TCP_NODELAY, persistent session),
//! decoding what masters publish into typed inbound events, and building the signed command a
//! master receives. The codec is `firmware-protocol`'s; nothing here parses wire bytes itself.

use std::time::Duration;

use firmware_protocol::message::{
    Announce, CommandAck, Online, RelayStateReport, Status, Telemetry,
};
use firmware_protocol::topic::filter;
use firmware_protocol::{CommandId, CommandSigner, DeviceId, MacAddr, MasterKey, Payload, Topic};
use rumqttc::{LastWill, MqttOptions, QoS};

use crate::config::MqttSection;
use crate::store::{CommandRecord, Reading};

/// Requests the MQTT client may queue before a publish waits.
pub const MQTT_REQUESTS_MAX: usize = 1_024;
pub const MQTT_KEEP_ALIVE_S: u64 = 5;
/// The largest packet the agent sends (commands and configurations are far smaller).
pub const MQTT_PACKET_BYTES_MAX: usize = 64 * 1024;
/// The largest packet the agent takes from the broker. rumqttc drops the whole connection on a
/// bigger one, so one oversized retained message would keep the agent off the broker for good;
/// the bound sits far above anything a broker delivers (the shipped broker config limits
/// messages to the protocol's 4096 bytes), and a payload over 4096 bytes is refused by
/// decoding and counted instead.
pub const MQTT_INCOMING_PACKET_BYTES_MAX: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("mqtt.url {0:?}: {1}")]
    Url(String, &'static str),
    #[error("mqtt.ca_file {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The topics the agent subscribes to, with the QoS of each: telemetry is QoS 0 in the
/// protocol, so a flood of it never fills the broker's in-flight window for the agent.
pub const SUBSCRIPTIONS: [(&str, QoS); 6] = [
    (filter::ALL_ANNOUNCE, QoS::AtLeastOnce),
    (filter::ALL_STATUS, QoS::AtLeastOnce),
    (filter::ALL_TELEMETRY, QoS::AtMostOnce),
    (filter::ALL_ACK, QoS::AtLeastOnce),
    (filter::ALL_RELAY_STATE, QoS::AtLeastOnce),
    (filter::EMERGENCY, QoS::AtLeastOnce),
];

/// Installs ring as rustls's crypto provider for the broker's TLS, once per process. rustls
/// picks one by itself only when exactly one is compiled in; saying it keeps that true if a
/// dependency ever brings another. An error only means one is installed already.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn mqtt_options(config: &MqttSection, agent_id: &str) -> Result<MqttOptions, BridgeError> {
    let (tls, rest) = if let Some(rest) = config.url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = config.url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(BridgeError::Url(
            config.url.clone(),
            "must start with mqtt:// or mqtts://",
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| BridgeError::Url(config.url.clone(), "bad port"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(BridgeError::Url(config.url.clone(), "no host"));
    }
    let mut options = MqttOptions::new(format!("autocore-agent-{agent_id}"), host, port);
    options.set_keep_alive(Duration::from_secs(MQTT_KEEP_ALIVE_S));
    // A persistent session: the broker keeps our subscriptions and queues QoS 1 acks while we
    // reconnect, so an ack sent during a broker blip is not lost.
    options.set_clean_session(false);
    options.set_max_packet_size(MQTT_INCOMING_PACKET_BYTES_MAX, MQTT_PACKET_BYTES_MAX);
    options.set_inflight(100);
    if let (Some(user), Some(pass)) = (&config.username, &config.password) {
        options.set_credentials(user, pass.expose());
    }
    if tls {
        let transport = match &config.ca_file {
            Some(path) => {
                let ca = std::fs::read(path).map_err(|source| BridgeError::CaFile {
                    path: path.display().to_string(),
                    source,
                })?;
                rumqttc::Transport::tls(ca, None, None)
            }
            None => rumqttc::Transport::tls_with_default_config(),
        };
        options.set_transport(transport);
    }
    let will_topic = gateway_status_topic(agent_id);
    let will = Status::last_will().encode().unwrap_or_default();
    options.set_last_will(LastWill::new(will_topic, will, QoS::AtLeastOnce, true));
    Ok(options)
}

pub fn gateway_status_topic(agent_id: &str) -> String {
    DeviceId::new(agent_id)
        .map(|id| Topic::GatewayStatus(id).to_string())
        .unwrap_or_else(|_| format!("autocore/gateway/{agent_id}/status"))
}

/// An event and connection loop with TCP_NODELAY: without it a QoS 1 round trip waits ~40 ms.
pub fn mqtt_client(options: MqttOptions) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, MQTT_REQUESTS_MAX);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// What a master told us, decoded and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Telemetry(Vec<Reading>),
    Ack(DeviceId, CommandAck),
    Announce(Announce),
    /// A master this agent does not serve announced itself: reported to the backend for an
    /// operator to adopt; nothing is sent to it.
    Discovered(Announce),
    Status(DeviceId, Status),
    RelayState(DeviceId, RelayStateReport),
    /// Someone pressed stop; the reason if the payload said one. Stopping is always safe, so a
    /// payload that does not decode still stops (PROTOCOL.md).
    EmergencyStop {
        reason: Option<String>,
        /// When the stop was issued (absent from buttons that do not say).
        issued_at_ms: Option<u64>,
    },
    EmergencyReset,
    /// A topic of ours that the agent does not act on (its own publications, config echoes).
    Ignored,
}

/// Why a message was refused; the label of the `bad_messages` metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    #[error("topic: {0}")]
    Topic(String),
    #[error("payload on {topic}: {reason}")]
    Payload { topic: String, reason: String },
    #[error("message from unknown device {0}")]
    UnknownDevice(String),
}

impl InboundError {
    pub fn reason_label(&self) -> &'static str {
        match self {
            InboundError::Topic(_) => "topic",
            InboundError::Payload { .. } => "payload",
            InboundError::UnknownDevice(_) => "unknown_device",
        }
    }
}

/// Decodes one publication. `known` says whether a device id is one of ours; messages from
/// other devices are refused (and counted) rather than stored. `now_ms` stamps readings that
/// carry no time of their own.
pub fn decode_inbound(
    topic: &str,
    payload: &[u8],
    known: impl Fn(&DeviceId) -> bool,
    now_ms: i64,
) -> Result<Inbound, InboundError> {
    let parsed = Topic::parse(topic).map_err(|e| InboundError::Topic(e.to_string()))?;
    let bad = |e: firmware_protocol::DecodeError| InboundError::Payload {
        topic: topic.to_string(),
        reason: e.to_string(),
    };
    if let Some(device) = parsed.device()
        && !matches!(parsed, Topic::Announce(_) | Topic::Command(_))
        && !known(device)
    {
        return Err(InboundError::UnknownDevice(device.to_string()));
    }
    Ok(match parsed {
        Topic::Telemetry(device) => {
            let t = Telemetry::decode(payload).map_err(bad)?;
            let at = t.ts_ms.map(|t| t as i64).unwrap_or(now_ms);
            Inbound::Telemetry(
                t.readings
                    .into_iter()
                    .map(|(key, r)| Reading {
                        device_id: device.to_string(),
                        sensor_key: key,
                        value: r.value,
                        unit: r.unit,
                        recorded_at_ms: at,
                        received_at_ms: Some(now_ms),
                    })
                    .collect(),
            )
        }
        Topic::Ack(device) => Inbound::Ack(device, CommandAck::decode(payload).map_err(bad)?),
        Topic::Announce(device) => {
            let a = Announce::decode(payload).map_err(bad)?;
            if a.device_id != device {
                return Err(InboundError::Payload {
                    topic: topic.to_string(),
                    reason: format!("announce names {} on the topic of {device}", a.device_id),
                });
            }
            if known(&device) {
                Inbound::Announce(a)
            } else {
                Inbound::Discovered(a)
            }
        }
        Topic::Status(device) => Inbound::Status(device, Status::decode(payload).map_err(bad)?),
        Topic::RelayState(device) => {
            Inbound::RelayState(device, RelayStateReport::decode(payload).map_err(bad)?)
        }
        // An empty retained payload is how the agent clears a stop; it releases nothing.
        Topic::EmergencyStop if payload.is_empty() => Inbound::Ignored,
        Topic::EmergencyStop => match firmware_protocol::message::Emergency::decode(payload) {
            Ok(e) => Inbound::EmergencyStop {
                reason: e.reason,
                issued_at_ms: e.issued_at_ms,
            },
            Err(e) => Inbound::EmergencyStop {
                reason: Some(format!("stop payload did not decode ({e})")),
                issued_at_ms: None,
            },
        },
        Topic::EmergencyReset => Inbound::EmergencyReset,
        Topic::Command(_) | Topic::Config(_) | Topic::GatewayStatus(_) => Inbound::Ignored,
    })
}

/// The wire id of a command the agent keeps under `id`: cloud rows by their id, commands the Pi
/// created (negative ids here, as in the local API's rows) as edge ids.
pub fn command_id(id: i64) -> Result<CommandId, firmware_protocol::command_id::CommandIdError> {
    CommandId::from_row_id(id)
}

/// The inverse of [`command_id`].
pub fn local_command_id(id: CommandId) -> i64 {
    id.row_id()
}

pub fn is_online(status: &Status) -> bool {
    status.status == Online::Online
}

/// The signed command for a master, and the topic to publish it on.
pub fn signed_command(
    command: &CommandRecord,
    key: &MasterKey,
    counter: u64,
) -> Result<(String, Vec<u8>), String> {
    let master = DeviceId::new(command.master_device_id.as_str()).map_err(|e| e.to_string())?;
    let slave: MacAddr = command
        .slave_mac_address
        .parse()
        .map_err(|e: firmware_protocol::mac::MacAddrError| e.to_string())?;
    let id = command_id(command.id).map_err(|e| e.to_string())?;
    let actions = command.actions.clone();
    let unsigned = firmware_protocol::message::RelayCommand::unsigned(
        id,
        master.clone(),
        slave,
        actions,
        command.expires_at_ms.max(0) as u64,
    );
    let sealed = CommandSigner::new(key.clone(), counter).seal(unsigned);
    let bytes = sealed.encode().map_err(|e| e.to_string())?;
    Ok((Topic::Command(master).to_string(), bytes))
}

#[cfg(test)]
mod tests {
    use firmware_protocol::CommandVerifier;

    use super::*;
    use crate::store::CommandState;

    fn known(_: &DeviceId) -> bool {
        true
    }

    #[test]
    fn telemetry_in_the_seed_shape_becomes_readings() {
        let payload =
            br#"{"v":1,"ts_ms":1700000000000,"ph":{"value":6.4,"unit":"pH"},"ec":{"value":1.2}}"#;
        let Inbound::Telemetry(readings) =
            decode_inbound("autocore/devices/ESP32_A/telemetry", payload, known, 5).unwrap()
        else {
            panic!("not telemetry")
        };
        assert_eq!(readings.len(), 2);
        let ph = readings.iter().find(|r| r.sensor_key == "ph").unwrap();
        assert_eq!(
            (ph.value, ph.unit.as_deref(), ph.recorded_at_ms),
            (6.4, Some("pH"), 1_700_000_000_000)
        );
    }

    #[test]
    fn malformed_payloads_and_topics_are_refused_with_a_reason() {
        let cases: [(&str, &[u8], &str); 5] = [
            (
                "autocore/devices/ESP32_A/telemetry",
                b"{not json",
                "payload",
            ),
            (
                "autocore/devices/ESP32_A/telemetry",
                br#"{"v":99,"ph":{"value":1}}"#,
                "payload",
            ),
            ("autocore/devices/ESP32_A/ack", br#"{"v":1}"#, "payload"),
            ("autocore/nothing/here", b"{}", "topic"),
            ("elsewhere/x", b"{}", "topic"),
        ];
        for (topic, payload, label) in cases {
            let err = decode_inbound(topic, payload, known, 0).unwrap_err();
            assert_eq!(err.reason_label(), label, "{topic}: {err}");
        }
    }

    #[test]
    fn an_unknown_master_that_announces_itself_is_discovered_not_served() {
        let payload = br#"{"v":1,"device_id":"ESP32_NEW","kind":"master","firmware":"1.0.0","mac":null,"slaves":[],"sensors":["ph"],"telemetry_interval_ms":1000}"#;
        let inbound = decode_inbound(
            "autocore/devices/ESP32_NEW/announce",
            payload,
            |d| d.as_str() == "ESP32_A",
            0,
        )
        .unwrap();
        assert!(matches!(inbound, Inbound::Discovered(a) if a.device_id.as_str() == "ESP32_NEW"));
    }

    #[test]
    fn a_message_from_an_unknown_device_is_refused() {
        let err = decode_inbound(
            "autocore/devices/STRANGER/telemetry",
            br#"{"v":1,"ph":{"value":1}}"#,
            |d| d.as_str() == "ESP32_A",
            0,
        )
        .unwrap_err();
        assert_eq!(err, InboundError::UnknownDevice("STRANGER".into()));
    }

    #[test]
    fn the_signed_command_verifies_under_the_masters_key_and_keeps_the_id() {
        let key = MasterKey::from_hex("00112233445566778899aabbccddeeff").unwrap();
        let record = CommandRecord {
            id: 42,
            master_device_id: "ESP32_A".into(),
            slave_mac_address: "14:33:5C:38:BF:60".into(),
            slave_device_id: None,
            actions: crate::command::actions_from_columns(
                &[0, 2],
                &["on".into(), "off".into()],
                &[60, 0],
            )
            .unwrap(),
            command_type: crate::command::CommandType::Manual,
            triggered_by: crate::command::CommandSource::Manual,
            priority: 10,
            rule_id: None,
            rule_name: None,
            expires_at_ms: 1_800_000_000_000,
            state: CommandState::Accepted,
            attempts: 0,
            last_sent_at_ms: None,
            polled_by: None,
        };
        let (topic, bytes) = signed_command(&record, &key, 7).unwrap();
        assert_eq!(topic, "autocore/devices/ESP32_A/command");
        let command = firmware_protocol::message::RelayCommand::decode(&bytes).unwrap();
        assert_eq!(command.command_id.backend_id(), Some(42));
        assert_eq!(command.actions.len(), 2);
        let mut verifier = CommandVerifier::new(DeviceId::new("ESP32_A").unwrap(), key, Some(6));
        verifier.verify(&command).unwrap();
        let other = MasterKey::from_hex("ffeeddccbbaa99887766554433221100").unwrap();
        let mut wrong = CommandVerifier::new(DeviceId::new("ESP32_A").unwrap(), other, None);
        assert!(wrong.verify(&command).is_err());
    }
}
