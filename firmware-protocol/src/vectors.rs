//! Test vectors for firmware authors, built from the real signer, codec and payload types. The
//! committed files in `vectors/` are these values, pretty-printed; a test fails when they drift
//! (`AUTOCORE_WRITE_VECTORS=1 cargo test -p firmware-protocol vectors` rewrites them).

use serde_json::{Value, json};

use crate::command_id::CommandId;
use crate::frame::{
    AckCode, FRAME_LEN, Frame, FrameBody, FrameRepr, RelayStates, ReportReason, SwitchAction, crc32,
};
use crate::mac::MacAddr;
use crate::message::{
    AckError, AckErrorCode, AckResult, Announce, CommandAck, DeviceId, DeviceKind, Emergency,
    Payload, RelayAction, RelayCommand, RelayStateReport, SlaveInfo, SlaveState, StateReason,
    Status, Telemetry,
};
use crate::sign::{
    CommandSigner, MasterKey, ReportSigner, ack_signing_bytes, broker_password,
    relay_states_signing_bytes, signature_hex, signing_bytes,
};
use crate::topic::{Qos, Topic};

/// Builds one vector document.
pub type VectorBuilder = fn() -> Value;

/// The vector files: name under `vectors/` and how to build it.
pub const FILES: [(&str, VectorBuilder); 4] = [
    ("signing.json", signing),
    ("reports.json", reports),
    ("frames.json", frames),
    ("payloads.json", payloads),
];

/// The key most vectors use: bytes 0x00..0x1f.
pub const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
/// A different key, for must-fail cases.
pub const OTHER_KEY_HEX: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";
/// A 16-byte key, the shortest allowed.
pub const SHORT_KEY_HEX: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";

fn key(hex: &str) -> MasterKey {
    // The constants above are valid keys; a typo would fail every vector test at once.
    MasterKey::from_hex(hex).unwrap_or_else(|e| panic!("vector key: {e}"))
}

fn master(text: &str) -> DeviceId {
    DeviceId::new(text).unwrap_or_else(|e| panic!("vector master id: {e}"))
}

fn mac(text: &str) -> MacAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("vector MAC address: {e}"))
}

fn json_of<P: Payload>(payload: &P) -> Value {
    serde_json::to_value(payload).unwrap_or_else(|e| panic!("vector payload: {e}"))
}

fn action(relay: u8, action: SwitchAction, duration_s: u32) -> RelayAction {
    RelayAction {
        relay,
        action,
        duration_s,
    }
}

fn sample_command(id: CommandId, master_id: &str, actions: Vec<RelayAction>) -> RelayCommand {
    RelayCommand::unsigned(
        id,
        master(master_id),
        mac("14:33:5C:38:BF:60"),
        actions,
        1_767_225_600_000,
    )
}

fn backend(id: i64) -> CommandId {
    CommandId::backend(id).unwrap_or_else(|e| panic!("vector id: {e}"))
}

fn edge(n: u64) -> CommandId {
    CommandId::edge(n).unwrap_or_else(|e| panic!("vector id: {e}"))
}

/// Signed commands, their signed bytes and signatures, and commands a master must refuse.
pub fn signing() -> Value {
    let good = [
        (
            "backend_id_one_relay_on",
            KEY_HEX,
            1,
            sample_command(
                backend(123),
                "ESP32_HIDRO_F44738",
                vec![action(0, SwitchAction::On, 60)],
            ),
        ),
        (
            "edge_id_three_relays_counter_from_unix_ms",
            KEY_HEX,
            1_767_225_000_123,
            sample_command(
                edge(42),
                "ESP32_HIDRO_F44738",
                vec![
                    action(0, SwitchAction::On, 0),
                    action(3, SwitchAction::Off, 0),
                    action(15, SwitchAction::On, 86_400),
                ],
            ),
        ),
        (
            "shortest_key_and_punctuated_master_id",
            SHORT_KEY_HEX,
            u64::MAX - 1,
            sample_command(
                backend(i64::MAX),
                "greenhouse-1.master:a_b",
                vec![action(7, SwitchAction::Off, 0)],
            ),
        ),
    ];
    let cases: Vec<Value> = good
        .into_iter()
        .map(|(name, key_hex, counter, command)| {
            let sealed = CommandSigner::new(key(key_hex), counter).seal(command);
            json!({
                "name": name,
                "key_hex": key_hex,
                "command": json_of(&sealed),
                "signing_bytes_hex": hex::encode(signing_bytes(&sealed)),
                "signature_hex": sealed.sig,
            })
        })
        .collect();

    let base = || {
        CommandSigner::new(key(KEY_HEX), 500).seal(sample_command(
            backend(77),
            "ESP32_HIDRO_F44738",
            vec![action(1, SwitchAction::On, 30)],
        ))
    };
    let mut must_fail = Vec::new();
    let mut case =
        |name: &str, command: RelayCommand, last: Option<u64>, verifier: &str, error: &str| {
            must_fail.push(json!({
                "name": name,
                "key_hex": KEY_HEX,
                "verifier_master_id": verifier,
                "last_counter": last,
                "command": json_of(&command),
                "error": error,
            }));
        };
    let m = "ESP32_HIDRO_F44738";
    case(
        "signed_with_another_key",
        CommandSigner::new(key(OTHER_KEY_HEX), 500).seal(sample_command(
            backend(77),
            m,
            vec![action(1, SwitchAction::On, 30)],
        )),
        None,
        m,
        "bad_signature",
    );
    let mut c = base();
    c.actions[0].duration_s = 3600;
    case(
        "duration_changed_after_signing",
        c,
        None,
        m,
        "bad_signature",
    );
    let mut c = base();
    c.actions[0].relay = 2;
    case("relay_changed_after_signing", c, None, m, "bad_signature");
    let mut c = base();
    c.actions[0].action = SwitchAction::Off;
    case("action_changed_after_signing", c, None, m, "bad_signature");
    let mut c = base();
    c.counter += 1;
    case(
        "counter_raised_without_signing",
        c,
        None,
        m,
        "bad_signature",
    );
    let mut c = base();
    c.expires_at_ms += 60_000;
    case("expiry_extended_after_signing", c, None, m, "bad_signature");
    let mut c = base();
    c.command_id = backend(78);
    case(
        "command_id_changed_after_signing",
        c,
        None,
        m,
        "bad_signature",
    );
    let mut c = base();
    if let Some(sig) = c.sig.as_mut() {
        let last = if sig.ends_with('0') { "1" } else { "0" };
        sig.pop();
        sig.push_str(last);
    }
    case("signature_last_digit_changed", c, None, m, "bad_signature");
    let mut c = base();
    c.sig = None;
    case("unsigned", c, None, m, "unsigned");
    case("replayed_counter", base(), Some(500), m, "replayed");
    case("older_counter", base(), Some(900), m, "replayed");
    let other = CommandSigner::new(key(KEY_HEX), 500).seal(sample_command(
        backend(77),
        "ESP32_OTHER_MASTER",
        vec![action(1, SwitchAction::On, 30)],
    ));
    case("signed_for_another_master", other, None, m, "wrong_master");

    json!({
        "description": "HMAC-SHA256 over signing_bytes (see PROTOCOL.md, 'Signing'); signature_hex is the lowercase hex of the 32-byte MAC. A master must accept every case (with last_counter below its counter) and refuse every must_fail case with the named error, given key_hex, verifier_master_id and last_counter (null: nothing accepted yet).",
        "algorithm": "HMAC-SHA256",
        "signing_domain": "autocore/command/v1",
        "cases": cases,
        "must_fail": must_fail,
    })
}

/// The report counter the examples start at (a boot time in Unix milliseconds).
pub const REPORT_COUNTER: u64 = 1_767_225_600_000;

fn sample_ack() -> CommandAck {
    CommandAck {
        v: 1,
        command_id: Some(backend(123)),
        result: AckResult::Completed,
        error: None,
        slave_mac: Some(mac("14:33:5C:38:BF:60")),
        relay_states: vec![true, false, false, false],
        execution_time_ms: 150,
        counter: None,
        sig: None,
    }
}

fn sample_failed_ack() -> CommandAck {
    CommandAck {
        v: 1,
        command_id: Some(edge(42)),
        result: AckResult::Failed,
        error: Some(AckError {
            code: AckErrorCode::SlaveUnreachable,
            message: "slave 14:33:5C:38:BF:60 did not answer".into(),
        }),
        slave_mac: Some(mac("14:33:5C:38:BF:60")),
        relay_states: vec![],
        execution_time_ms: 1000,
        counter: None,
        sig: None,
    }
}

fn sample_relay_states() -> RelayStateReport {
    RelayStateReport {
        v: 1,
        slaves: vec![
            SlaveState {
                mac: mac("14:33:5C:38:BF:60"),
                online: true,
                relay_states: vec![true, false, false, false],
                emergency_latched: false,
                reason: StateReason::Command,
            },
            SlaveState {
                mac: mac("14:33:5C:38:BF:61"),
                online: false,
                relay_states: vec![false, false],
                emergency_latched: true,
                reason: StateReason::EmergencyStop,
            },
        ],
        counter: None,
        sig: None,
    }
}

/// Signed acks and relay state reports, and the masters' broker passwords.
pub fn reports() -> Value {
    let m = master("ESP32_HIDRO_F44738");
    let signer = || ReportSigner::new(m.clone(), key(KEY_HEX), REPORT_COUNTER);
    let ack_case = |name: &str, ack: CommandAck| {
        let sealed = signer().seal_ack(ack);
        json!({
            "name": name,
            "kind": "ack",
            "key_hex": KEY_HEX,
            "topic": Topic::Ack(m.clone()).to_string(),
            "payload": json_of(&sealed),
            "signing_bytes_hex": hex::encode(ack_signing_bytes(&m, &sealed)),
            "signature_hex": sealed.sig,
        })
    };
    let sealed_states = signer().seal_relay_states(sample_relay_states());
    let cases = vec![
        ack_case("ack_completed", sample_ack()),
        ack_case("ack_failed_with_error", sample_failed_ack()),
        json!({
            "name": "relay_states_two_slaves",
            "kind": "relay_states",
            "key_hex": KEY_HEX,
            "topic": Topic::RelayState(m.clone()).to_string(),
            "payload": json_of(&sealed_states),
            "signing_bytes_hex": hex::encode(relay_states_signing_bytes(&m, &sealed_states)),
            "signature_hex": sealed_states.sig,
        }),
    ];

    let good = signer().seal_ack(sample_ack());
    let mut must_fail = Vec::new();
    let mut case =
        |name: &str, kind: &str, payload: Value, topic: &str, highest: Option<u64>, error: &str| {
            must_fail.push(json!({
                "name": name,
                "kind": kind,
                "key_hex": KEY_HEX,
                "topic": topic,
                "highest_counter": highest,
                "payload": payload,
                "error": error,
            }));
        };
    let ack_topic = Topic::Ack(m.clone()).to_string();
    let mut a = good.clone();
    a.relay_states = vec![true, true, true, true];
    case(
        "ack_relay_states_changed",
        "ack",
        json_of(&a),
        &ack_topic,
        None,
        "bad_signature",
    );
    let mut a = good.clone();
    a.result = AckResult::Duplicate;
    case(
        "ack_result_changed",
        "ack",
        json_of(&a),
        &ack_topic,
        None,
        "bad_signature",
    );
    let mut a = good.clone();
    a.command_id = Some(backend(124));
    case(
        "ack_command_id_changed",
        "ack",
        json_of(&a),
        &ack_topic,
        None,
        "bad_signature",
    );
    let mut a = good.clone();
    a.counter = a.counter.map(|c| c + 1);
    case(
        "ack_counter_changed",
        "ack",
        json_of(&a),
        &ack_topic,
        None,
        "bad_signature",
    );
    let forged =
        ReportSigner::new(m.clone(), key(OTHER_KEY_HEX), REPORT_COUNTER).seal_ack(sample_ack());
    case(
        "ack_signed_with_another_key",
        "ack",
        json_of(&forged),
        &ack_topic,
        None,
        "bad_signature",
    );
    case(
        "ack_on_another_masters_topic",
        "ack",
        json_of(&good),
        &Topic::Ack(master("ESP32_OTHER_MASTER")).to_string(),
        None,
        "bad_signature",
    );
    let mut a = good.clone();
    a.sig = None;
    a.counter = None;
    case(
        "ack_unsigned",
        "ack",
        json_of(&a),
        &ack_topic,
        None,
        "unsigned",
    );
    case(
        "ack_replayed",
        "ack",
        json_of(&good),
        &ack_topic,
        Some(REPORT_COUNTER),
        "replayed",
    );
    case(
        "ack_older_than_the_window",
        "ack",
        json_of(&good),
        &ack_topic,
        Some(REPORT_COUNTER + crate::sign::REPORT_REPLAY_WINDOW),
        "replayed",
    );
    let mut r = sealed_states.clone();
    r.slaves[1].emergency_latched = false;
    case(
        "relay_states_latch_changed",
        "relay_states",
        json_of(&r),
        &Topic::RelayState(m.clone()).to_string(),
        None,
        "bad_signature",
    );

    let passwords: Vec<Value> = [
        ("ESP32_HIDRO_F44738", KEY_HEX),
        ("greenhouse-1.master:a_b", SHORT_KEY_HEX),
    ]
    .into_iter()
    .map(|(device, key_hex)| {
        json!({
            "device_id": device,
            "key_hex": key_hex,
            "username": device,
            "password": broker_password(&key(key_hex), &master(device)),
        })
    })
    .collect();

    json!({
        "description": "Acks and relay state reports a master signs (PROTOCOL.md, 'Signing reports'): HMAC-SHA256 under the master's key over signing_bytes, built with the master id of the topic. The agent accepts every case and refuses every must_fail case with the named error, given key_hex, the topic and highest_counter (the highest counter it accepted from that master; null: none yet; a counter up to 63 below it is accepted once). broker_passwords: each master's MQTT login (PROTOCOL.md, 'Broker credentials').",
        "algorithm": "HMAC-SHA256",
        "signing_domain": "autocore/report/v1",
        "replay_window": crate::sign::REPORT_REPLAY_WINDOW,
        "cases": cases,
        "must_fail": must_fail,
        "broker_passwords": passwords,
    })
}

/// The fields of a frame as the vectors spell them.
pub fn frame_fields(repr: &FrameRepr) -> Value {
    let mut v = json!({
        "sequence": repr.sequence,
        "emergency_latched": repr.emergency_latched,
    });
    let states = |s: RelayStates| json!({"bits": s.bits, "count": s.count});
    let id = |raw: u64| match CommandId::from_raw(raw) {
        Ok(id) => json!(id.to_string()),
        Err(_) => json!(raw.to_string()),
    };
    let fields = match repr.body {
        FrameBody::RelayCommand {
            command_id,
            relay,
            action,
            duration_s,
        } => json!({
            "kind": "relay_command",
            "command_id": id(command_id),
            "command_id_raw": command_id.to_string(),
            "relay": relay,
            "action": match action { SwitchAction::On => "on", SwitchAction::Off => "off" },
            "duration_s": duration_s,
        }),
        FrameBody::Ack {
            command_id,
            relay,
            code,
            states: s,
            elapsed_ms,
        } => json!({
            "kind": "ack",
            "command_id": id(command_id),
            "command_id_raw": command_id.to_string(),
            "relay": relay,
            "code": format!("{code:?}"),
            "relay_states": states(s),
            "elapsed_ms": elapsed_ms,
        }),
        FrameBody::StateReport { reason, states: s } => json!({
            "kind": "state_report",
            "reason": format!("{reason:?}"),
            "relay_states": states(s),
        }),
        FrameBody::Heartbeat => json!({"kind": "heartbeat"}),
        FrameBody::PairingRequest { relay_count } => {
            json!({"kind": "pairing_request", "relay_count": relay_count})
        }
        FrameBody::PairingAccept => json!({"kind": "pairing_accept"}),
        FrameBody::EmergencyStop => json!({"kind": "emergency_stop"}),
        FrameBody::EmergencyReset => json!({"kind": "emergency_reset"}),
    };
    if let (Some(v), Some(fields)) = (v.as_object_mut(), fields.as_object()) {
        for (k, f) in fields {
            v.insert(k.clone(), f.clone());
        }
    }
    v
}

fn emitted(repr: &FrameRepr) -> [u8; FRAME_LEN] {
    repr.to_bytes()
        .unwrap_or_else(|e| panic!("vector frame {repr:?}: {e}"))
}

/// Frames of every kind with their bytes, and byte strings a receiver must refuse.
pub fn frames() -> Value {
    let reprs = [
        (
            "relay_command_on_60s",
            FrameRepr {
                sequence: 1,
                emergency_latched: false,
                body: FrameBody::RelayCommand {
                    command_id: backend(123).to_raw(),
                    relay: 0,
                    action: SwitchAction::On,
                    duration_s: 60,
                },
            },
        ),
        (
            "relay_command_off_edge_id",
            FrameRepr {
                sequence: 0xDEAD_BEEF,
                emergency_latched: false,
                body: FrameBody::RelayCommand {
                    command_id: edge(42).to_raw(),
                    relay: 15,
                    action: SwitchAction::Off,
                    duration_s: 0,
                },
            },
        ),
        (
            "ack_applied",
            FrameRepr {
                sequence: 1,
                emergency_latched: false,
                body: FrameBody::Ack {
                    command_id: backend(123).to_raw(),
                    relay: 0,
                    code: AckCode::Applied,
                    states: RelayStates {
                        bits: 0b0001,
                        count: 4,
                    },
                    elapsed_ms: 12,
                },
            },
        ),
        (
            "ack_refused_emergency_latched",
            FrameRepr {
                sequence: 2,
                emergency_latched: true,
                body: FrameBody::Ack {
                    command_id: backend(124).to_raw(),
                    relay: 1,
                    code: AckCode::EmergencyLatched,
                    states: RelayStates { bits: 0, count: 4 },
                    elapsed_ms: 0,
                },
            },
        ),
        (
            "state_report_master_silent",
            FrameRepr {
                sequence: 9,
                emergency_latched: false,
                body: FrameBody::StateReport {
                    reason: ReportReason::MasterSilent,
                    states: RelayStates { bits: 0, count: 8 },
                },
            },
        ),
        (
            "state_report_sixteen_relays",
            FrameRepr {
                sequence: 10,
                emergency_latched: false,
                body: FrameBody::StateReport {
                    reason: ReportReason::Heartbeat,
                    states: RelayStates {
                        bits: 0x8001,
                        count: 16,
                    },
                },
            },
        ),
        (
            "heartbeat_latched",
            FrameRepr {
                sequence: 3,
                emergency_latched: true,
                body: FrameBody::Heartbeat,
            },
        ),
        (
            "pairing_request",
            FrameRepr {
                sequence: 1,
                emergency_latched: false,
                body: FrameBody::PairingRequest { relay_count: 4 },
            },
        ),
        (
            "pairing_accept",
            FrameRepr {
                sequence: 1,
                emergency_latched: false,
                body: FrameBody::PairingAccept,
            },
        ),
        (
            "emergency_stop",
            FrameRepr {
                sequence: 4,
                emergency_latched: true,
                body: FrameBody::EmergencyStop,
            },
        ),
        (
            "emergency_reset",
            FrameRepr {
                sequence: 5,
                emergency_latched: false,
                body: FrameBody::EmergencyReset,
            },
        ),
    ];
    let cases: Vec<Value> = reprs
        .iter()
        .map(|(name, repr)| {
            json!({
                "name": name,
                "fields": frame_fields(repr),
                "bytes_hex": hex::encode(emitted(repr)),
            })
        })
        .collect();

    let good = emitted(&reprs[0].1);
    // Changes a field and recomputes the tag, so the check after the tag is what fails.
    let retagged = |offset: usize, value: u8| {
        let mut b = good;
        b[offset] = value;
        Frame::new_unchecked(&mut b[..]).fill_tag();
        b.to_vec()
    };
    let mut must_fail: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "truncated"),
        (
            "one_byte_short",
            good[..FRAME_LEN - 1].to_vec(),
            "truncated",
        ),
        ("one_byte_long", [&good[..], &[0]].concat(), "oversized"),
        ("max_espnow_payload", vec![0; 250], "oversized"),
        ("bad_magic", retagged(0, b'X'), "bad_magic"),
        ("version_2", retagged(2, 2), "unsupported_version"),
        ("unknown_kind_9", retagged(3, 9), "unknown_kind"),
        ("unknown_flag_bit", retagged(4, 0x02), "unknown_flags"),
        ("relay_16", retagged(5, 16), "relay_out_of_range"),
        ("action_toggle_3", retagged(6, 3), "unknown_action"),
        ("action_missing", retagged(6, 0), "missing_field"),
        ("reserved_set", retagged(27, 1), "unused_field_set"),
        (
            "duration_over_a_day",
            {
                let mut b = good;
                b[20..24].copy_from_slice(&86_401u32.to_le_bytes());
                Frame::new_unchecked(&mut b[..]).fill_tag();
                b.to_vec()
            },
            "duration_out_of_range",
        ),
    ];
    let mut flipped = good;
    flipped[20] ^= 0x01;
    must_fail.push(("duration_bit_flipped_tag_kept", flipped.to_vec(), "bad_tag"));
    let mut tag = good;
    tag[35] ^= 0x80;
    must_fail.push(("tag_bit_flipped", tag.to_vec(), "bad_tag"));
    let must_fail: Vec<Value> = must_fail
        .into_iter()
        .map(|(name, bytes, error)| json!({"name": name, "bytes_hex": hex::encode(bytes), "error": error}))
        .collect();

    json!({
        "description": "ESP-NOW frames (see PROTOCOL.md, 'ESP-NOW frames'): 36 bytes, little-endian, CRC-32 (zlib) over bytes 0..32 in bytes 32..36. A receiver must parse every case to its fields and refuse every must_fail case; error names the first check that fails, in the order length, magic, version, tag, kind, flags, fields.",
        "frame_len": FRAME_LEN,
        "crc32_check": {"input_ascii": "123456789", "crc32_hex": format!("{:08x}", crc32(b"123456789"))},
        "cases": cases,
        "must_fail": must_fail,
    })
}

fn example<P: Payload>(name: &str, topic: Topic, payload: &P) -> Value {
    json!({
        "name": name,
        "topic": topic.to_string(),
        "qos": match topic.qos() { Qos::AtMostOnce => 0, Qos::AtLeastOnce => 1 },
        "retain": topic.retain(),
        "payload_type": P::WHAT,
        "payload": json_of(payload),
    })
}

/// One valid payload per topic, and payloads a receiver must refuse.
pub fn payloads() -> Value {
    let m = master("ESP32_HIDRO_F44738");
    let mut reporter = ReportSigner::new(m.clone(), key(KEY_HEX), REPORT_COUNTER);
    let slave = mac("14:33:5C:38:BF:60");
    let sealed = CommandSigner::new(key(KEY_HEX), 1).seal(sample_command(
        backend(123),
        "ESP32_HIDRO_F44738",
        vec![action(0, SwitchAction::On, 60)],
    ));
    let mut readings = std::collections::BTreeMap::new();
    readings.insert(
        "ph".to_string(),
        crate::message::Reading {
            value: 6.8,
            unit: Some("pH".into()),
        },
    );
    readings.insert(
        "water_temp".to_string(),
        crate::message::Reading {
            value: 22.5,
            unit: Some("°C".into()),
        },
    );
    let examples = vec![
        example(
            "announce",
            Topic::Announce(m.clone()),
            &Announce {
                v: 1,
                device_id: m.clone(),
                kind: DeviceKind::Master,
                firmware: "1.4.2".into(),
                mac: Some(mac("F4:12:FA:44:73:80")),
                slaves: vec![SlaveInfo {
                    mac: slave,
                    relay_count: 4,
                }],
                sensors: vec!["ph".into(), "water_temp".into()],
                telemetry_interval_ms: 1000,
            },
        ),
        example(
            "status_online",
            Topic::Status(m.clone()),
            &Status::online(false),
        ),
        example(
            "status_last_will",
            Topic::Status(m.clone()),
            &Status::last_will(),
        ),
        example(
            "gateway_last_will",
            Topic::GatewayStatus(master("pi-greenhouse")),
            &Status::last_will(),
        ),
        example(
            "telemetry",
            Topic::Telemetry(m.clone()),
            &Telemetry {
                v: 1,
                ts_ms: Some(1_767_225_600_000),
                readings,
            },
        ),
        example("command_signed", Topic::Command(m.clone()), &sealed),
        example(
            "ack_completed",
            Topic::Ack(m.clone()),
            &reporter.seal_ack(sample_ack()),
        ),
        example(
            "ack_rejected_bad_signature",
            Topic::Ack(m.clone()),
            &reporter.seal_ack(CommandAck {
                v: 1,
                command_id: Some(backend(124)),
                result: AckResult::Rejected,
                error: Some(AckError {
                    code: AckErrorCode::BadSignature,
                    message: "signature does not match (wrong key or changed content)".into(),
                }),
                slave_mac: Some(slave),
                relay_states: vec![true, false, false, false],
                execution_time_ms: 0,
                counter: None,
                sig: None,
            }),
        ),
        example(
            "relay_states",
            Topic::RelayState(m.clone()),
            &reporter.seal_relay_states(RelayStateReport {
                v: 1,
                slaves: vec![SlaveState {
                    mac: slave,
                    online: true,
                    relay_states: vec![true, false, false, false],
                    emergency_latched: false,
                    reason: StateReason::Command,
                }],
                counter: None,
                sig: None,
            }),
        ),
        example(
            "emergency_stop",
            Topic::EmergencyStop,
            &Emergency {
                v: 1,
                reason: Some("stop button on the dashboard".into()),
                issued_at_ms: Some(1_767_225_600_000),
            },
        ),
        example(
            "emergency_reset",
            Topic::EmergencyReset,
            &Emergency::new("checked by the operator"),
        ),
        example(
            "device_config",
            Topic::device_config(&m),
            &crate::message::DeviceConfig {
                v: 1,
                telemetry_interval_ms: 1000,
                master_silent_timeout_ms: 5000,
                slaves: vec![crate::message::SlaveConfig {
                    mac: slave,
                    relays: vec![
                        crate::message::RelayLimits {
                            max_on_s: 600,
                            boot_on: false,
                        };
                        4
                    ],
                }],
            },
        ),
    ];

    let good = sealed.encode().unwrap_or_default();
    let bad = |name: &str, payload_type: &str, bytes: Vec<u8>, error: &str| json!({"name": name, "payload_type": payload_type, "payload_hex": hex::encode(bytes), "error": error});
    let mut must_fail = vec![
        bad("command_empty", "command", vec![], "empty"),
        bad(
            "command_truncated",
            "command",
            good[..good.len() - 1].to_vec(),
            "not_json",
        ),
        bad(
            "command_oversized",
            "command",
            [&good[..], &vec![b' '; crate::message::PAYLOAD_BYTES_MAX]].concat(),
            "too_large",
        ),
        bad(
            "command_random_bytes",
            "command",
            vec![0x93, 0x00, 0xff, 0x10],
            "not_json",
        ),
        bad("command_array", "command", b"[1,2,3]".to_vec(), "not_json"),
        bad(
            "command_no_version",
            "command",
            b"{\"command_id\":\"backend:1\"}".to_vec(),
            "missing_version",
        ),
        bad(
            "command_version_2",
            "command",
            b"{\"v\":2}".to_vec(),
            "unsupported_version",
        ),
    ];
    let mut value: Value = serde_json::from_slice(&good).unwrap_or_default();
    value["actions"][0]["action"] = json!("toggle");
    must_fail.push(bad(
        "command_toggle",
        "command",
        serde_json::to_vec(&value).unwrap_or_default(),
        "shape",
    ));
    let mut value: Value = serde_json::from_slice(&good).unwrap_or_default();
    value["actions"][0]["relay"] = json!(16);
    must_fail.push(bad(
        "command_relay_16",
        "command",
        serde_json::to_vec(&value).unwrap_or_default(),
        "field",
    ));
    let mut value: Value = serde_json::from_slice(&good).unwrap_or_default();
    value["actions"][0]["duration_s"] = json!(86_401);
    must_fail.push(bad(
        "command_duration_over_a_day",
        "command",
        serde_json::to_vec(&value).unwrap_or_default(),
        "field",
    ));
    let mut value: Value = serde_json::from_slice(&good).unwrap_or_default();
    value["command_id"] = json!(123);
    must_fail.push(bad(
        "command_id_as_number",
        "command",
        serde_json::to_vec(&value).unwrap_or_default(),
        "shape",
    ));
    must_fail.push(bad(
        "telemetry_sensor_name_uppercase",
        "telemetry",
        b"{\"v\":1,\"PH\":{\"value\":6.8}}".to_vec(),
        "field",
    ));
    must_fail.push(bad(
        "telemetry_value_not_a_number",
        "telemetry",
        b"{\"v\":1,\"ph\":{\"value\":\"6.8\"}}".to_vec(),
        "shape",
    ));
    must_fail.push(bad(
        "status_unknown_field",
        "status",
        b"{\"v\":1,\"status\":\"online\",\"extra\":true}".to_vec(),
        "shape",
    ));
    must_fail.push(bad(
        "ack_rejected_without_error",
        "ack",
        b"{\"v\":1,\"command_id\":\"backend:1\",\"result\":\"rejected\",\"slave_mac\":null,\"relay_states\":[],\"execution_time_ms\":0}".to_vec(),
        "field",
    ));

    json!({
        "description": "One valid payload per topic with its QoS and retain flag, and payloads a receiver must refuse (payload_hex, decoded as payload_type) with the named check. Checks run in the order size, JSON object, version \"v\", shape, field ranges.",
        "protocol_version": crate::message::PROTOCOL_VERSION,
        "payload_bytes_max": crate::message::PAYLOAD_BYTES_MAX,
        "examples": examples,
        "must_fail": must_fail,
    })
}

/// Decodes `bytes` as the payload type named `what` (a [`Payload::WHAT`]) and re-encodes it as
/// a JSON value; used to check the vectors.
pub fn decode_named(what: &str, bytes: &[u8]) -> Result<Value, crate::message::DecodeError> {
    fn go<P: Payload>(bytes: &[u8]) -> Result<Value, crate::message::DecodeError> {
        P::decode(bytes).map(|p| json_of(&p))
    }
    match what {
        Announce::WHAT => go::<Announce>(bytes),
        Status::WHAT => go::<Status>(bytes),
        Telemetry::WHAT => go::<Telemetry>(bytes),
        RelayCommand::WHAT => go::<RelayCommand>(bytes),
        CommandAck::WHAT => go::<CommandAck>(bytes),
        RelayStateReport::WHAT => go::<RelayStateReport>(bytes),
        Emergency::WHAT => go::<Emergency>(bytes),
        crate::message::DeviceConfig::WHAT => go::<crate::message::DeviceConfig>(bytes),
        other => Err(crate::message::DecodeError::Shape {
            what: "vector",
            reason: format!("no payload type {other:?}"),
        }),
    }
}

/// The signature over a command without changing it; used to check the vectors.
pub fn signature_for(command: &RelayCommand, key_hex: &str) -> Option<String> {
    MasterKey::from_hex(key_hex)
        .ok()
        .map(|k| signature_hex(command, &k))
}
