//! Topics: every kind builds and parses back, with the documented QoS and retain flags.

use firmware_protocol::topic::{Qos, Topic, TopicError};

use crate::fixtures::master;

#[test]
fn every_topic_round_trips_through_its_string() {
    let id = master();
    let topics = [
        (
            Topic::Announce(id.clone()),
            "autocore/devices/ESP32_HIDRO_F44738/announce",
        ),
        (
            Topic::Status(id.clone()),
            "autocore/devices/ESP32_HIDRO_F44738/status",
        ),
        (
            Topic::Telemetry(id.clone()),
            "autocore/devices/ESP32_HIDRO_F44738/telemetry",
        ),
        (
            Topic::Command(id.clone()),
            "autocore/devices/ESP32_HIDRO_F44738/command",
        ),
        (
            Topic::Ack(id.clone()),
            "autocore/devices/ESP32_HIDRO_F44738/ack",
        ),
        (
            Topic::RelayState(id.clone()),
            "autocore/devices/ESP32_HIDRO_F44738/relays/state",
        ),
        (Topic::EmergencyStop, "autocore/emergency/stop"),
        (Topic::EmergencyReset, "autocore/emergency/reset"),
        (
            Topic::device_config(&id),
            "autocore/config/devices/ESP32_HIDRO_F44738",
        ),
        (Topic::Config("theme".into()), "autocore/config/theme"),
        (
            Topic::GatewayStatus(firmware_protocol::DeviceId::new("pi-1").unwrap()),
            "autocore/gateway/pi-1/status",
        ),
    ];
    for (topic, text) in topics {
        assert_eq!(topic.to_string(), text);
        assert_eq!(Topic::parse(text).unwrap(), topic);
    }
}

#[test]
fn telemetry_is_qos_0_and_commands_are_qos_1_not_retained() {
    assert_eq!(Topic::Telemetry(master()).qos(), Qos::AtMostOnce);
    assert_eq!(Topic::Command(master()).qos(), Qos::AtLeastOnce);
    assert!(!Topic::Command(master()).retain());
    assert!(!Topic::Ack(master()).retain());
    assert!(Topic::Status(master()).retain());
    assert!(Topic::EmergencyStop.retain());
    assert!(!Topic::EmergencyReset.retain());
}

#[test]
fn foreign_unknown_and_wildcard_topics_are_refused() {
    assert!(matches!(
        Topic::parse("other/devices/x/ack"),
        Err(TopicError::NotOurs { .. })
    ));
    assert!(matches!(
        Topic::parse("autocore/devices/x/bogus"),
        Err(TopicError::Unknown { .. })
    ));
    assert!(matches!(
        Topic::parse("autocore/devices/+/ack"),
        Err(TopicError::BadId { .. })
    ));
    assert!(matches!(
        Topic::parse("autocore/config/"),
        Err(TopicError::BadConfigPath { .. })
    ));
    assert!(matches!(
        Topic::parse("autocore/config/a//b"),
        Err(TopicError::BadConfigPath { .. })
    ));
    assert!(matches!(
        Topic::parse(&"a".repeat(300)),
        Err(TopicError::TooLong { .. })
    ));
}
