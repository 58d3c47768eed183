//! JSON payloads: shapes as documented, round trips, and typed errors for truncated, oversized,
//! wrong-version, out-of-range and random input.

use std::collections::BTreeMap;

use firmware_protocol::message::{
    AckError, AckErrorCode, AckResult, Announce, CommandAck, DecodeError, DeviceKind, Emergency,
    PAYLOAD_BYTES_MAX, Reading, RelayCommand, RelayStateReport, SlaveInfo, Status, Telemetry,
};
use firmware_protocol::{CommandId, CommandOrigin, CommandSigner, PROTOCOL_VERSION, Payload};
use proptest::prelude::*;
use serde_json::json;

use crate::fixtures::{command, key, master, slave_mac};

#[test]
fn telemetry_uses_the_seeds_key_value_unit_shape() {
    let bytes = br#"{"v":1,"ts_ms":5,"ph":{"value":6.8,"unit":"pH"},"temp":{"value":21.5}}"#;
    let telemetry = Telemetry::decode(bytes).unwrap();
    assert_eq!(telemetry.ts_ms, Some(5));
    assert_eq!(
        telemetry.readings["ph"],
        Reading {
            value: 6.8,
            unit: Some("pH".into())
        }
    );
    assert_eq!(telemetry.readings["temp"].unit, None);
    let again: serde_json::Value = serde_json::from_slice(&telemetry.encode().unwrap()).unwrap();
    assert_eq!(
        again,
        serde_json::from_slice::<serde_json::Value>(bytes).unwrap()
    );
}

#[test]
fn telemetry_with_a_bad_sensor_name_or_value_says_which() {
    let err = Telemetry::decode(br#"{"v":1,"PH!":{"value":1}}"#).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Field { field, .. } if field == "PH!"),
        "{err}"
    );
    let err = Telemetry::decode(br#"{"v":1,"ph":{"value":"high"}}"#).unwrap_err();
    assert!(matches!(err, DecodeError::Shape { .. }), "{err}");
    let mut readings = BTreeMap::new();
    readings.insert(
        "ph".to_string(),
        Reading {
            value: f64::NAN,
            unit: None,
        },
    );
    let t = Telemetry {
        v: 1,
        ts_ms: None,
        readings,
    };
    assert!(t.encode().is_err());
}

#[test]
fn a_command_round_trips_with_its_id_as_a_string() {
    let sealed = CommandSigner::new(key(), 3).seal(command(42));
    let bytes = sealed.encode().unwrap();
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(value["command_id"], json!("backend:42"));
    assert_eq!(
        value["actions"][0],
        json!({"relay":0,"action":"on","duration_s":60})
    );
    assert_eq!(value["v"], json!(PROTOCOL_VERSION));
    assert_eq!(RelayCommand::decode(&bytes).unwrap(), sealed);
}

#[test]
fn command_ids_hold_backend_row_ids_and_edge_ids_apart() {
    let backend = CommandId::backend(i64::MAX).unwrap();
    let edge = CommandId::edge(i64::MAX as u64).unwrap();
    assert_ne!(backend.to_raw(), edge.to_raw());
    assert_eq!(backend.origin(), CommandOrigin::Backend);
    assert_eq!(edge.origin(), CommandOrigin::Edge);
    assert_eq!(backend.backend_id(), Some(i64::MAX));
    assert_eq!(edge.backend_id(), None);
    assert_eq!(
        "edge:7".parse::<CommandId>().unwrap(),
        CommandId::edge(7).unwrap()
    );
    assert_eq!(CommandId::from_raw(edge.to_raw()).unwrap(), edge);
    for bad in [
        "backend:0",
        "backend:-1",
        "edge:0",
        "cloud:1",
        "backend:+1",
        "backend",
        "edge:9223372036854775808",
    ] {
        assert!(bad.parse::<CommandId>().is_err(), "{bad}");
    }
    assert!(CommandId::from_raw(0).is_err());
    // Rows: positive ids are the backend's, negative ones the Pi's own (its local API).
    assert_eq!(
        CommandId::from_row_id(5).unwrap(),
        CommandId::backend(5).unwrap()
    );
    assert_eq!(
        CommandId::from_row_id(-5).unwrap(),
        CommandId::edge(5).unwrap()
    );
    for id in [5, -5, i64::MAX, -i64::MAX] {
        assert_eq!(CommandId::from_row_id(id).unwrap().row_id(), id);
    }
    assert!(CommandId::from_row_id(0).is_err());
    assert!(CommandId::from_row_id(i64::MIN).is_err());
}

#[test]
fn a_command_with_a_relay_out_of_range_names_the_field() {
    let mut cmd = command(1);
    cmd.actions[0].relay = 16;
    let bytes = serde_json::to_vec(&cmd).unwrap();
    let err = RelayCommand::decode(&bytes).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Field { field, .. } if field == "actions[0].relay"),
        "{err}"
    );
    assert!(cmd.encode().is_err(), "encode refuses what decode refuses");
}

#[test]
fn a_command_with_a_duration_over_a_day_or_a_repeated_relay_is_refused() {
    let mut cmd = command(1);
    cmd.actions[0].duration_s = 86_401;
    assert!(cmd.encode().is_err());
    let mut cmd = command(1);
    cmd.actions.push(cmd.actions[0]);
    assert!(matches!(
        cmd.encode(),
        Err(firmware_protocol::EncodeError::Invalid(
            DecodeError::Field { .. }
        ))
    ));
}

#[test]
fn toggles_are_not_an_action() {
    let mut value = serde_json::to_value(command(1)).unwrap();
    value["actions"][0]["action"] = json!("toggle");
    let err = RelayCommand::decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
    assert!(matches!(err, DecodeError::Shape { .. }), "{err}");
}

#[test]
fn a_wrong_version_is_reported_before_the_shape() {
    let err = Status::decode(br#"{"v":2,"anything":"else"}"#).unwrap_err();
    assert!(
        matches!(err, DecodeError::UnsupportedVersion { .. }),
        "{err}"
    );
    let err = Status::decode(br#"{"status":"online"}"#).unwrap_err();
    assert!(matches!(err, DecodeError::MissingVersion { .. }), "{err}");
}

#[test]
fn truncated_empty_and_oversized_payloads_give_typed_errors() {
    let bytes = CommandSigner::new(key(), 1)
        .seal(command(1))
        .encode()
        .unwrap();
    for cut in 1..bytes.len() {
        assert!(matches!(
            RelayCommand::decode(&bytes[..cut]),
            Err(DecodeError::NotJson { .. })
        ));
    }
    assert!(matches!(
        RelayCommand::decode(b""),
        Err(DecodeError::Empty { .. })
    ));
    let big = vec![b' '; PAYLOAD_BYTES_MAX + 1];
    assert!(matches!(
        RelayCommand::decode(&big),
        Err(DecodeError::TooLarge { .. })
    ));
    assert!(matches!(
        RelayCommand::decode(b"[1,2]"),
        Err(DecodeError::NotJson { .. })
    ));
}

#[test]
fn unknown_fields_are_refused() {
    let err = Status::decode(br#"{"v":1,"status":"online","extra":1}"#).unwrap_err();
    assert!(matches!(err, DecodeError::Shape { .. }), "{err}");
}

#[test]
fn the_last_will_is_an_offline_status() {
    let will = Status::decode(&Status::last_will().encode().unwrap()).unwrap();
    assert_eq!(will.status, firmware_protocol::message::Online::Offline);
}

#[test]
fn a_rejected_ack_must_say_why() {
    let mut ack = CommandAck {
        v: 1,
        command_id: Some(CommandId::backend(9).unwrap()),
        result: AckResult::Rejected,
        error: None,
        slave_mac: Some(slave_mac()),
        relay_states: vec![false; 4],
        execution_time_ms: 0,
        counter: None,
        sig: None,
    };
    assert!(ack.encode().is_err());
    ack.error = Some(AckError {
        code: AckErrorCode::BadSignature,
        message: "signature does not match".into(),
    });
    let decoded = CommandAck::decode(&ack.encode().unwrap()).unwrap();
    assert_eq!(decoded, ack);
}

#[test]
fn announce_and_emergency_and_relay_state_round_trip() {
    let announce = Announce {
        v: 1,
        device_id: master(),
        kind: DeviceKind::Master,
        firmware: "sim-0.1".into(),
        mac: None,
        slaves: vec![SlaveInfo {
            mac: slave_mac(),
            relay_count: 4,
        }],
        sensors: vec!["ph".into()],
        telemetry_interval_ms: 1000,
    };
    assert_eq!(
        Announce::decode(&announce.encode().unwrap()).unwrap(),
        announce
    );
    let stop = Emergency::new("button");
    assert_eq!(Emergency::decode(&stop.encode().unwrap()).unwrap(), stop);
    let report = RelayStateReport {
        v: 1,
        slaves: vec![],
        counter: None,
        sig: None,
    };
    assert_eq!(
        RelayStateReport::decode(&report.encode().unwrap()).unwrap(),
        report
    );
}

proptest! {
    #[test]
    fn random_bytes_decode_to_a_value_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = RelayCommand::decode(&bytes);
        let _ = Telemetry::decode(&bytes);
        let _ = CommandAck::decode(&bytes);
        let _ = Status::decode(&bytes);
        let _ = Announce::decode(&bytes);
        let _ = Emergency::decode(&bytes);
    }

    #[test]
    fn random_json_objects_with_the_right_version_never_panic(
        keys in proptest::collection::vec("[a-z_]{1,12}", 0..8),
        numbers in proptest::collection::vec(any::<f64>(), 0..8),
    ) {
        let mut map = serde_json::Map::new();
        map.insert("v".into(), json!(1));
        for (k, n) in keys.iter().zip(numbers.iter()) {
            map.insert(k.clone(), json!({"value": n}));
        }
        let bytes = serde_json::to_vec(&map).unwrap();
        let _ = Telemetry::decode(&bytes);
        let _ = RelayCommand::decode(&bytes);
    }
}

#[test]
fn an_ack_error_code_is_named_as_the_wire_writes_it() {
    use firmware_protocol::message::AckErrorCode;
    for code in [
        AckErrorCode::Malformed,
        AckErrorCode::Unsigned,
        AckErrorCode::BadSignature,
        AckErrorCode::Replayed,
        AckErrorCode::WrongMaster,
        AckErrorCode::Expired,
        AckErrorCode::EmergencyLatched,
        AckErrorCode::UnknownSlave,
        AckErrorCode::NoSuchRelay,
        AckErrorCode::SlaveUnreachable,
        AckErrorCode::Busy,
    ] {
        assert_eq!(json!(code), json!(code.as_str()));
    }
}
