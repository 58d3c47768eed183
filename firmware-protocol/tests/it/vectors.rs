//! The committed test vectors: they match what the code produces today, and each case checks
//! out against the codec, the signer and the payload types on its own.

use std::path::PathBuf;

use firmware_protocol::frame::FrameRepr;
use firmware_protocol::message::{CommandAck, RelayCommand, RelayStateReport};
use firmware_protocol::sign::{
    CommandVerifier, MasterKey, ReplayWindow, ReportVerifier, VerifyError, ack_signing_bytes,
    broker_password, relay_states_signing_bytes, signing_bytes,
};
use firmware_protocol::{DeviceId, Payload, Topic, vectors};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

fn committed(name: &str) -> Value {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

#[test]
fn committed_vector_files_match_what_the_code_produces() {
    let write = std::env::var("AUTOCORE_WRITE_VECTORS").is_ok_and(|v| v == "1");
    for (name, build) in vectors::FILES {
        let text = serde_json::to_string_pretty(&build()).unwrap() + "\n";
        let path = vectors_dir().join(name);
        if write {
            std::fs::create_dir_all(vectors_dir()).unwrap();
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "vectors/{name} drifted from the code; rerun with AUTOCORE_WRITE_VECTORS=1 and review the diff"
        );
    }
}

#[test]
fn every_signing_vector_verifies_and_every_tampered_one_fails_with_its_error() {
    let file = committed("signing.json");
    let cases = file["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for case in cases {
        let name = str_of(case, "name");
        let command = RelayCommand::decode(&serde_json::to_vec(&case["command"]).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            hex::encode(signing_bytes(&command)),
            str_of(case, "signing_bytes_hex"),
            "{name}"
        );
        let key_hex = str_of(case, "key_hex");
        assert_eq!(
            vectors::signature_for(&command, key_hex).as_deref(),
            Some(str_of(case, "signature_hex")),
            "{name}"
        );
        assert_eq!(command.sig.as_deref(), Some(str_of(case, "signature_hex")));
        let mut verifier = CommandVerifier::new(
            command.master_id.clone(),
            MasterKey::from_hex(key_hex).unwrap(),
            None,
        );
        verifier
            .verify(&command)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let must_fail = file["must_fail"].as_array().unwrap();
    assert!(must_fail.len() >= 8);
    for case in must_fail {
        let name = str_of(case, "name");
        let command = RelayCommand::decode(&serde_json::to_vec(&case["command"]).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut verifier = CommandVerifier::new(
            DeviceId::new(str_of(case, "verifier_master_id")).unwrap(),
            MasterKey::from_hex(str_of(case, "key_hex")).unwrap(),
            case["last_counter"].as_u64(),
        );
        let error = verifier
            .verify(&command)
            .expect_err(&format!("{name} must fail"));
        assert_eq!(error.check_name(), str_of(case, "error"), "{name}");
    }
}

#[test]
fn every_frame_vector_parses_to_its_fields_and_every_bad_one_fails_its_check() {
    let file = committed("frames.json");
    let check = &file["crc32_check"];
    assert_eq!(
        format!(
            "{:08x}",
            firmware_protocol::frame::crc32(str_of(check, "input_ascii").as_bytes())
        ),
        str_of(check, "crc32_hex")
    );
    for case in file["cases"].as_array().unwrap() {
        let name = str_of(case, "name");
        let bytes = hex::decode(str_of(case, "bytes_hex")).unwrap();
        let repr = FrameRepr::from_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(vectors::frame_fields(&repr), case["fields"], "{name}");
        assert_eq!(repr.to_bytes().unwrap().to_vec(), bytes, "{name}");
    }
    for case in file["must_fail"].as_array().unwrap() {
        let name = str_of(case, "name");
        let bytes = hex::decode(str_of(case, "bytes_hex")).unwrap();
        let error = FrameRepr::from_bytes(&bytes).expect_err(name);
        assert_eq!(error.check_name(), str_of(case, "error"), "{name}: {error}");
    }
}

#[test]
fn every_payload_example_decodes_and_every_bad_payload_fails_its_check() {
    let file = committed("payloads.json");
    for case in file["examples"].as_array().unwrap() {
        let name = str_of(case, "name");
        let topic = Topic::parse(str_of(case, "topic")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            topic.qos() as u8 as u64,
            case["qos"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(topic.retain(), case["retain"].as_bool().unwrap(), "{name}");
        let bytes = serde_json::to_vec(&case["payload"]).unwrap();
        let decoded = vectors::decode_named(str_of(case, "payload_type"), &bytes)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decoded, case["payload"], "{name}");
    }
    for case in file["must_fail"].as_array().unwrap() {
        let name = str_of(case, "name");
        let bytes = hex::decode(str_of(case, "payload_hex")).unwrap();
        let error = vectors::decode_named(str_of(case, "payload_type"), &bytes).expect_err(name);
        assert_eq!(error.check_name(), str_of(case, "error"), "{name}: {error}");
    }
}

#[test]
fn the_signed_example_command_verifies_with_the_documented_key() {
    let file = committed("payloads.json");
    let example = file["examples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "command_signed")
        .unwrap();
    let command = RelayCommand::decode(&serde_json::to_vec(&example["payload"]).unwrap()).unwrap();
    let mut verifier = CommandVerifier::new(
        command.master_id.clone(),
        MasterKey::from_hex(vectors::KEY_HEX).unwrap(),
        None,
    );
    verifier.verify(&command).unwrap();
}

/// Decodes a report vector's payload and verifies it as the agent does, for the master of its
/// topic, with the window at `highest` (only that counter seen).
fn verify_report(case: &Value) -> Result<(), VerifyError> {
    let name = str_of(case, "name");
    let topic = Topic::parse(str_of(case, "topic")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let master = topic.device().cloned().expect("a master's topic");
    let window = match case["highest_counter"].as_u64() {
        Some(highest) => ReplayWindow::from_parts(Some(highest), 1),
        None => ReplayWindow::default(),
    };
    let key = MasterKey::from_hex(str_of(case, "key_hex")).unwrap();
    let mut verifier = ReportVerifier::new(master, key, window);
    let bytes = serde_json::to_vec(&case["payload"]).unwrap();
    match str_of(case, "kind") {
        "ack" => verifier
            .verify_ack(&CommandAck::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"))),
        "relay_states" => verifier.verify_relay_states(
            &RelayStateReport::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}")),
        ),
        other => panic!("{name}: unknown kind {other}"),
    }
}

#[test]
fn every_report_vector_verifies_and_every_tampered_or_replayed_one_fails_with_its_error() {
    let file = committed("reports.json");
    let cases = file["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for case in cases {
        let name = str_of(case, "name");
        let bytes = serde_json::to_vec(&case["payload"]).unwrap();
        let topic = Topic::parse(str_of(case, "topic")).unwrap();
        let master = topic.device().cloned().unwrap();
        let signed = match str_of(case, "kind") {
            "ack" => ack_signing_bytes(&master, &CommandAck::decode(&bytes).unwrap()),
            _ => relay_states_signing_bytes(&master, &RelayStateReport::decode(&bytes).unwrap()),
        };
        assert_eq!(
            hex::encode(signed),
            str_of(case, "signing_bytes_hex"),
            "{name}"
        );
        assert_eq!(case["payload"]["sig"], case["signature_hex"], "{name}");
        verify_report(case).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let must_fail = file["must_fail"].as_array().unwrap();
    assert!(must_fail.len() >= 8);
    for case in must_fail {
        let name = str_of(case, "name");
        let error = verify_report(case).expect_err(&format!("{name} must fail"));
        assert_eq!(error.check_name(), str_of(case, "error"), "{name}");
    }
    for login in file["broker_passwords"].as_array().unwrap() {
        let device = DeviceId::new(str_of(login, "device_id")).unwrap();
        let key = MasterKey::from_hex(str_of(login, "key_hex")).unwrap();
        assert_eq!(broker_password(&key, &device), str_of(login, "password"));
        assert_eq!(str_of(login, "username"), device.as_str());
    }
}
