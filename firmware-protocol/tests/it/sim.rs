//! The simulator's state machines without I/O: a slave's own safety rules and at-most-once
//! application, and a master's handling of commands, polled rows and bad input.

use std::time::Duration;

use firmware_protocol::frame::{
    AckCode, FrameBody, FrameRepr, RelayStates, ReportReason, SwitchAction,
};
use firmware_protocol::message::{
    AckErrorCode, AckResult, CommandAck, Payload, RelayAction, RelayLimits,
};
use firmware_protocol::sim::master::{MasterCore, MasterState, Output, SlaveCommandRow};
use firmware_protocol::sim::radio::Radio;
use firmware_protocol::sim::slave::{SlaveNode, SlaveSpec};
use firmware_protocol::sim::{MasterSpec, MasterTiming, RadioSpec};
use firmware_protocol::{CommandId, CommandSigner, MacAddr, Topic};
use tokio::time::Instant;

use crate::fixtures::{command, key, master, slave_mac};

const SILENT: Duration = Duration::from_secs(5);

fn slave_spec(max_on_s: u32, boot_on: &[u8]) -> SlaveSpec {
    SlaveSpec {
        mac: slave_mac(),
        relays: (0..4)
            .map(|r| RelayLimits {
                max_on_s,
                boot_on: boot_on.contains(&r),
            })
            .collect(),
    }
}

fn bytes(body: FrameBody, sequence: u32, emergency_latched: bool) -> Vec<u8> {
    FrameRepr {
        sequence,
        emergency_latched,
        body,
    }
    .to_bytes()
    .unwrap()
    .to_vec()
}

fn relay_command(command_id: u64, relay: u8, action: SwitchAction, duration_s: u32) -> Vec<u8> {
    bytes(
        FrameBody::RelayCommand {
            command_id,
            relay,
            action,
            duration_s,
        },
        command_id as u32,
        false,
    )
}

fn heartbeat() -> Vec<u8> {
    bytes(FrameBody::Heartbeat, 1, false)
}

fn ack_code(frames: &[FrameRepr]) -> AckCode {
    frames
        .iter()
        .find_map(|f| match f.body {
            FrameBody::Ack { code, .. } => Some(code),
            _ => None,
        })
        .expect("an ack")
}

#[test]
fn a_slave_boots_with_relays_off_unless_configured_on() {
    let t0 = Instant::now();
    let (node, report) = SlaveNode::boot(&slave_spec(0, &[2]), SILENT, false, t0);
    assert_eq!(
        node.states(),
        RelayStates {
            bits: 0b100,
            count: 4
        }
    );
    assert!(matches!(
        report.body,
        FrameBody::StateReport {
            reason: ReportReason::Boot,
            ..
        }
    ));
}

#[test]
fn a_slave_switches_a_relay_off_when_its_duration_ends() {
    let t0 = Instant::now();
    let (mut node, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    let out = node
        .on_frame(&relay_command(1, 0, SwitchAction::On, 2), t0)
        .unwrap();
    assert_eq!(ack_code(&out), AckCode::Applied);
    assert!(node.states().is_on(0));
    assert!(node.tick(t0 + Duration::from_millis(1999)).is_empty());
    assert!(node.states().is_on(0));
    let out = node.tick(t0 + Duration::from_secs(2));
    assert!(!node.states().is_on(0));
    assert!(matches!(
        out[0].body,
        FrameBody::StateReport {
            reason: ReportReason::DurationEnded,
            ..
        }
    ));
}

#[test]
fn a_slave_enforces_the_maximum_on_time_even_when_told_to_stay_on_longer() {
    let t0 = Instant::now();
    let (mut node, _) = SlaveNode::boot(&slave_spec(3, &[]), Duration::from_secs(3600), false, t0);
    node.on_frame(&relay_command(1, 1, SwitchAction::On, 600), t0)
        .unwrap();
    // A second "on" does not restart the maximum on-time.
    node.on_frame(
        &relay_command(2, 1, SwitchAction::On, 600),
        t0 + Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(node.next_deadline(), Some(t0 + Duration::from_secs(3)));
    let out = node.tick(t0 + Duration::from_secs(3));
    assert!(!node.states().is_on(1));
    assert!(matches!(
        out[0].body,
        FrameBody::StateReport {
            reason: ReportReason::MaxOnTime,
            ..
        }
    ));
}

#[test]
fn a_boot_on_relay_is_bounded_by_its_maximum_on_time_too() {
    let t0 = Instant::now();
    let (mut node, _) =
        SlaveNode::boot(&slave_spec(10, &[0]), Duration::from_secs(3600), false, t0);
    assert!(node.states().is_on(0));
    node.tick(t0 + Duration::from_secs(10));
    assert!(!node.states().is_on(0));
}

#[test]
fn a_slave_whose_master_goes_silent_switches_off_and_says_why_once_contact_returns() {
    let t0 = Instant::now();
    let (mut node, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    node.on_frame(&relay_command(1, 0, SwitchAction::On, 0), t0)
        .unwrap();
    assert!(node.tick(t0 + SILENT - Duration::from_millis(1)).is_empty());
    assert!(node.states().is_on(0));
    node.tick(t0 + SILENT);
    assert_eq!(node.states().bits, 0);
    assert_eq!(
        node.next_deadline(),
        None,
        "nothing is due until the master speaks again"
    );
    let out = node.on_frame(&heartbeat(), t0 + SILENT * 2).unwrap();
    let reasons: Vec<_> = out
        .iter()
        .filter_map(|f| match f.body {
            FrameBody::StateReport { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        vec![ReportReason::MasterSilent, ReportReason::Heartbeat]
    );
    let out = node.on_frame(&heartbeat(), t0 + SILENT * 2).unwrap();
    assert_eq!(out.len(), 1, "the silence is reported once");
}

#[test]
fn a_slave_applies_a_command_id_at_most_once() {
    let t0 = Instant::now();
    let (mut node, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    node.on_frame(&relay_command(1, 0, SwitchAction::On, 60), t0)
        .unwrap();
    node.on_frame(&relay_command(2, 0, SwitchAction::Off, 0), t0)
        .unwrap();
    let out = node
        .on_frame(&relay_command(1, 0, SwitchAction::On, 60), t0)
        .unwrap();
    assert_eq!(ack_code(&out), AckCode::Duplicate);
    assert!(
        !node.states().is_on(0),
        "the late duplicate did not switch the relay on again"
    );
}

#[test]
fn a_slave_rebooted_with_its_applied_pairs_still_answers_duplicate_and_does_not_switch() {
    let t0 = Instant::now();
    let (mut before, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    before
        .on_frame(&relay_command(7, 2, SwitchAction::On, 60), t0)
        .unwrap();
    let kept = before.applied();
    assert_eq!(kept, vec![(7, 2)]);

    let (mut after, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    after.restore_applied(&kept);
    let out = after
        .on_frame(&relay_command(7, 2, SwitchAction::On, 60), t0)
        .unwrap();
    assert_eq!(ack_code(&out), AckCode::Duplicate);
    assert!(
        !after.states().is_on(2),
        "the resent command did not switch"
    );

    // Without the kept pairs the same frame would switch the relay a second time.
    let (mut forgetful, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    let out = forgetful
        .on_frame(&relay_command(7, 2, SwitchAction::On, 60), t0)
        .unwrap();
    assert_eq!(ack_code(&out), AckCode::Applied);
}

#[test]
fn an_actuation_log_reads_back_every_line_it_was_given() {
    use firmware_protocol::sim::state::{
        Actuation, actuation_log_path, append_actuation, read_actuations,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = actuation_log_path(dir.path(), &master(), slave_mac());
    assert!(read_actuations(&path).unwrap().is_empty(), "no log yet");
    let lines = vec![
        Actuation {
            command_id: "backend:12".into(),
            relay: 1,
            action: "on".into(),
            duration_s: 3,
            at_ms: 1_700_000_000_000,
        },
        Actuation {
            command_id: "edge:4".into(),
            relay: 1,
            action: "off".into(),
            duration_s: 0,
            at_ms: 1_700_000_003_000,
        },
    ];
    for a in &lines {
        append_actuation(&path, a).unwrap();
    }
    assert_eq!(read_actuations(&path).unwrap(), lines);
    std::fs::write(&path, "{not json\n").unwrap();
    assert!(read_actuations(&path).is_err(), "a damaged log is an error");
}

#[test]
fn a_slave_refuses_a_relay_it_does_not_have() {
    let t0 = Instant::now();
    let (mut node, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    let out = node
        .on_frame(&relay_command(1, 7, SwitchAction::On, 60), t0)
        .unwrap();
    assert_eq!(ack_code(&out), AckCode::NoSuchRelay);
}

#[test]
fn an_emergency_stop_latches_a_slave_until_a_reset() {
    let t0 = Instant::now();
    let (mut node, _) = SlaveNode::boot(&slave_spec(0, &[1]), SILENT, false, t0);
    node.on_frame(&relay_command(1, 0, SwitchAction::On, 60), t0)
        .unwrap();
    node.on_frame(&bytes(FrameBody::EmergencyStop, 9, true), t0)
        .unwrap();
    assert_eq!(node.states().bits, 0);
    assert!(node.emergency_latched());
    let out = node
        .on_frame(&relay_command(2, 0, SwitchAction::On, 60), t0)
        .unwrap();
    assert_eq!(ack_code(&out), AckCode::EmergencyLatched);
    assert_eq!(node.states().bits, 0);
    node.on_frame(&bytes(FrameBody::EmergencyReset, 10, false), t0)
        .unwrap();
    let out = node
        .on_frame(&relay_command(3, 0, SwitchAction::On, 60), t0)
        .unwrap();
    assert_eq!(ack_code(&out), AckCode::Applied);
}

#[test]
fn a_slave_that_missed_the_stop_latches_on_the_next_heartbeat() {
    let t0 = Instant::now();
    let (mut node, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    node.on_frame(&relay_command(1, 0, SwitchAction::On, 60), t0)
        .unwrap();
    node.on_frame(&bytes(FrameBody::Heartbeat, 2, true), t0)
        .unwrap();
    assert!(node.emergency_latched());
    assert_eq!(node.states().bits, 0);
}

#[test]
fn a_latched_slave_boots_with_every_relay_off() {
    let t0 = Instant::now();
    let (node, report) = SlaveNode::boot(&slave_spec(0, &[0, 1]), SILENT, true, t0);
    assert_eq!(node.states().bits, 0);
    assert!(report.emergency_latched);
}

#[test]
fn a_slave_survives_bad_frames_and_keeps_serving() {
    let t0 = Instant::now();
    let (mut node, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    let good = relay_command(1, 0, SwitchAction::On, 60);
    let mut wrong_version = good.clone();
    wrong_version[2] = 9;
    let inputs: Vec<Vec<u8>> = vec![
        vec![],
        good[..10].to_vec(),
        [good.clone(), vec![0; 300]].concat(),
        wrong_version,
        vec![0xAA; 36],
    ];
    for input in inputs {
        assert!(node.on_frame(&input, t0).is_err());
    }
    assert_eq!(node.states().bits, 0);
    assert_eq!(
        ack_code(&node.on_frame(&good, t0).unwrap()),
        AckCode::Applied
    );
}

// ---------------------------------------------------------------------------------------------
// master

fn master_core() -> MasterCore {
    let spec = MasterSpec {
        id: master(),
        key: key(),
        slaves: vec![slave_spec(0, &[])],
        sensors: vec![],
    };
    MasterCore::new(&spec, MasterTiming::default(), MasterState::default())
}

fn command_topic() -> String {
    Topic::Command(master()).to_string()
}

fn acks(outputs: &[Output]) -> Vec<CommandAck> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Publish {
                topic: Topic::Ack(_),
                payload,
            } => Some(CommandAck::decode(payload).unwrap()),
            _ => None,
        })
        .collect()
}

fn frames(outputs: &[Output]) -> Vec<FrameRepr> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Frame { bytes, .. } => Some(FrameRepr::from_bytes(bytes).unwrap()),
            _ => None,
        })
        .collect()
}

const NOW_MS: u64 = 1_800_000_000_000;

#[test]
fn a_master_forwards_a_verified_command_and_acks_when_the_slave_confirms() {
    let t0 = Instant::now();
    let mut core = master_core();
    let sealed = CommandSigner::new(key(), 1).seal(command(5));
    let out = core.on_mqtt(&command_topic(), &sealed.encode().unwrap(), t0, NOW_MS);
    let sent = frames(&out);
    assert_eq!(sent.len(), 1);
    let FrameBody::RelayCommand {
        command_id, relay, ..
    } = sent[0].body
    else {
        panic!("expected a relay command, got {:?}", sent[0]);
    };
    assert_eq!(command_id, CommandId::backend(5).unwrap().to_raw());
    let ack = bytes(
        FrameBody::Ack {
            command_id,
            relay,
            code: AckCode::Applied,
            states: RelayStates { bits: 1, count: 4 },
            elapsed_ms: 0,
        },
        sent[0].sequence,
        false,
    );
    let out = core.on_radio(slave_mac(), &ack, t0 + Duration::from_millis(30));
    let acks = acks(&out);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].result, AckResult::Completed);
    assert_eq!(acks[0].relay_states, vec![true, false, false, false]);
    assert_eq!(acks[0].execution_time_ms, 30);
}

#[test]
fn a_master_answers_bad_commands_with_a_rejection_and_keeps_serving() {
    let t0 = Instant::now();
    let mut core = master_core();
    let good = CommandSigner::new(key(), 10)
        .seal(command(5))
        .encode()
        .unwrap();
    let mut wrong_version: serde_json::Value = serde_json::from_slice(&good).unwrap();
    wrong_version["v"] = serde_json::json!(99);
    let inputs: Vec<(Vec<u8>, AckErrorCode)> = vec![
        (b"".to_vec(), AckErrorCode::Malformed),
        (good[..good.len() / 2].to_vec(), AckErrorCode::Malformed),
        (vec![b'{'; 10_000], AckErrorCode::Malformed),
        (
            serde_json::to_vec(&wrong_version).unwrap(),
            AckErrorCode::Malformed,
        ),
        (vec![0xFF, 0x00, 0x13], AckErrorCode::Malformed),
        (command(5).encode().unwrap(), AckErrorCode::Unsigned),
    ];
    for (input, code) in inputs {
        let out = core.on_mqtt(&command_topic(), &input, t0, NOW_MS);
        assert!(frames(&out).is_empty());
        let acks = acks(&out);
        assert_eq!(acks.len(), 1);
        assert_eq!(acks[0].result, AckResult::Rejected);
        assert_eq!(acks[0].error.as_ref().unwrap().code, code);
    }
    let out = core.on_mqtt(&command_topic(), &good, t0, NOW_MS);
    assert_eq!(frames(&out).len(), 1, "still serving after bad input");
    let out = core.on_mqtt(&command_topic(), &good, t0, NOW_MS);
    assert_eq!(
        acks(&out)[0].error.as_ref().unwrap().code,
        AckErrorCode::Replayed
    );
}

#[test]
fn a_master_never_runs_an_expired_command() {
    let mut core = master_core();
    let mut cmd = command(5);
    cmd.expires_at_ms = NOW_MS - 1;
    let sealed = CommandSigner::new(key(), 1).seal(cmd);
    let out = core.on_mqtt(
        &command_topic(),
        &sealed.encode().unwrap(),
        Instant::now(),
        NOW_MS,
    );
    assert!(frames(&out).is_empty());
    assert_eq!(acks(&out)[0].result, AckResult::Expired);
}

#[test]
fn a_master_applies_a_command_id_at_most_once_even_when_signed_again() {
    let t0 = Instant::now();
    let mut core = master_core();
    let mut signer = CommandSigner::new(key(), 1);
    core.on_mqtt(
        &command_topic(),
        &signer.seal(command(5)).encode().unwrap(),
        t0,
        NOW_MS,
    );
    let out = core.on_mqtt(
        &command_topic(),
        &signer.seal(command(5)).encode().unwrap(),
        t0,
        NOW_MS,
    );
    assert!(frames(&out).is_empty(), "nothing is sent again");
    assert!(
        acks(&out).is_empty(),
        "a copy of a command still in progress gets no ack of its own: the running one will ack"
    );
}

#[test]
fn a_master_fails_a_command_whose_slave_never_answers() {
    let t0 = Instant::now();
    let mut core = master_core();
    let sealed = CommandSigner::new(key(), 1).seal(command(5));
    core.on_mqtt(&command_topic(), &sealed.encode().unwrap(), t0, NOW_MS);
    let timing = MasterTiming::default();
    let mut resent = 0;
    let mut failed = Vec::new();
    for step in 1..=timing.frame_attempts_max + 1 {
        let out = core.on_retry_tick(
            t0 + Duration::from_millis(timing.frame_ack_timeout_ms * u64::from(step)),
        );
        resent += frames(&out).len();
        failed.extend(acks(&out));
    }
    assert_eq!(resent as u32, timing.frame_attempts_max - 1);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].result, AckResult::Failed);
    assert_eq!(
        failed[0].error.as_ref().unwrap().code,
        AckErrorCode::SlaveUnreachable
    );
    // The command never ran, so the agent's retry with the same id runs.
    let retry = CommandSigner::new(key(), 2).seal(command(5));
    let out = core.on_mqtt(&command_topic(), &retry.encode().unwrap(), t0, NOW_MS);
    assert_eq!(
        frames(&out).len(),
        1,
        "a failed command can be retried under its id"
    );
}

#[test]
fn a_master_drops_bad_radio_frames_and_keeps_serving() {
    let t0 = Instant::now();
    let mut core = master_core();
    for garbage in [vec![], vec![0u8; 36], vec![1u8; 500]] {
        assert!(core.on_radio(slave_mac(), &garbage, t0).is_empty());
    }
    let sealed = CommandSigner::new(key(), 1).seal(command(5));
    let out = core.on_mqtt(&command_topic(), &sealed.encode().unwrap(), t0, NOW_MS);
    assert_eq!(frames(&out).len(), 1);
}

#[test]
fn an_emergency_stop_latches_the_master_and_refuses_on_commands() {
    let t0 = Instant::now();
    let mut core = master_core();
    // Even an unreadable stop message stops: stopping is always safe.
    let out = core.on_mqtt("autocore/emergency/stop", b"garbage", t0, NOW_MS);
    assert!(core.emergency_latched());
    assert!(
        frames(&out)
            .iter()
            .any(|f| f.body == FrameBody::EmergencyStop)
    );
    let sealed = CommandSigner::new(key(), 1).seal(command(5));
    let out = core.on_mqtt(&command_topic(), &sealed.encode().unwrap(), t0, NOW_MS);
    assert_eq!(
        acks(&out)[0].error.as_ref().unwrap().code,
        AckErrorCode::EmergencyLatched
    );
    // An unreadable reset does not release it; a valid one does.
    core.on_mqtt("autocore/emergency/reset", b"garbage", t0, NOW_MS);
    assert!(core.emergency_latched());
    let reset = firmware_protocol::message::Emergency::new("cleared")
        .encode()
        .unwrap();
    core.on_mqtt("autocore/emergency/reset", &reset, t0, NOW_MS);
    assert!(!core.emergency_latched());
}

fn row(id: i64, expires_at: &str) -> SlaveCommandRow {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "master_device_id": master().to_string(),
        "slave_mac_address": slave_mac().to_string(),
        "relay_numbers": [0],
        "actions": ["on"],
        "duration_seconds": [30],
        "expires_at": expires_at,
        "status": "processing",
        "command_type": "manual",
    }))
    .unwrap()
}

#[test]
fn a_polled_row_that_expired_is_failed_and_never_sent() {
    let mut core = master_core();
    let out = core.on_polled(
        vec![row(7, "2020-01-01T00:00:00+00:00")],
        Instant::now(),
        NOW_MS,
    );
    assert!(frames(&out).is_empty());
    let completion = out
        .iter()
        .find_map(|o| match o {
            Output::Complete(c) => Some(c.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(completion.command_id, 7);
    assert!(completion.outcome.unwrap_err().contains("expired"));
}

#[test]
fn a_polled_row_runs_and_completes_with_relay_states() {
    // A backend row, and one the Pi created (its local API serves those with negative ids).
    for row_id in [8, -8] {
        let t0 = Instant::now();
        let mut core = master_core();
        let out = core.on_polled(
            vec![row(row_id, "2999-01-01T00:00:00.123456+00:00")],
            t0,
            NOW_MS,
        );
        let sent = frames(&out);
        assert_eq!(sent.len(), 1);
        let FrameBody::RelayCommand {
            command_id,
            relay,
            action,
            duration_s,
        } = sent[0].body
        else {
            panic!("expected a relay command");
        };
        assert_eq!((relay, action, duration_s), (0, SwitchAction::On, 30));
        assert_eq!(command_id, CommandId::from_row_id(row_id).unwrap().to_raw());
        let ack = bytes(
            FrameBody::Ack {
                command_id,
                relay,
                code: AckCode::Applied,
                states: RelayStates { bits: 1, count: 4 },
                elapsed_ms: 0,
            },
            sent[0].sequence,
            false,
        );
        let out = core.on_radio(slave_mac(), &ack, t0);
        let completion = out
            .iter()
            .find_map(|o| match o {
                Output::Complete(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(completion.command_id, row_id);
        assert_eq!(completion.outcome, Ok(vec![true, false, false, false]));
    }
}

#[test]
fn a_duplicate_answer_to_a_resent_frame_counts_as_applied() {
    // The first ack was lost; the slave answers the resend with "duplicate".
    let t0 = Instant::now();
    let mut core = master_core();
    let sealed = CommandSigner::new(key(), 1).seal(command(5));
    core.on_mqtt(&command_topic(), &sealed.encode().unwrap(), t0, NOW_MS);
    let timeout = Duration::from_millis(MasterTiming::default().frame_ack_timeout_ms);
    let resent = frames(&core.on_retry_tick(t0 + timeout));
    assert_eq!(resent.len(), 1);
    let FrameBody::RelayCommand {
        command_id, relay, ..
    } = resent[0].body
    else {
        panic!("expected a relay command");
    };
    let duplicate = bytes(
        FrameBody::Ack {
            command_id,
            relay,
            code: AckCode::Duplicate,
            states: RelayStates { bits: 1, count: 4 },
            elapsed_ms: 0,
        },
        resent[0].sequence,
        false,
    );
    let out = core.on_radio(slave_mac(), &duplicate, t0 + timeout);
    assert_eq!(acks(&out)[0].result, AckResult::Completed);
}

// ---------------------------------------------------------------------------------------------
// commands for several relays, and the radio between master and slave

fn relay_command_seq(
    sequence: u32,
    command_id: u64,
    relay: u8,
    action: SwitchAction,
    duration_s: u32,
) -> Vec<u8> {
    bytes(
        FrameBody::RelayCommand {
            command_id,
            relay,
            action,
            duration_s,
        },
        sequence,
        false,
    )
}

fn ack_states(frames: &[FrameRepr]) -> RelayStates {
    frames
        .iter()
        .find_map(|f| match f.body {
            FrameBody::Ack { states, .. } => Some(states),
            _ => None,
        })
        .expect("an ack")
}

#[test]
fn a_slave_applies_each_relay_of_one_command_once() {
    // One command id, two relays: the slave remembers (command id, relay), so the second relay
    // is not mistaken for a duplicate of the first, while a repeat of either frame is.
    let t0 = Instant::now();
    let (mut node, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    let relay_0 = relay_command_seq(1, 7, 0, SwitchAction::On, 30);
    let relay_2 = relay_command_seq(2, 7, 2, SwitchAction::On, 30);
    let out = node.on_frame(&relay_0, t0).unwrap();
    assert_eq!(ack_code(&out), AckCode::Applied);
    assert_eq!(ack_states(&out).bits, 0b0001);
    let out = node.on_frame(&relay_2, t0).unwrap();
    assert_eq!(ack_code(&out), AckCode::Applied);
    assert_eq!(ack_states(&out).bits, 0b0101);

    // Another command switches relay 0 off; late copies of the first command's frames change
    // nothing.
    node.on_frame(&relay_command_seq(3, 8, 0, SwitchAction::Off, 0), t0)
        .unwrap();
    for frame in [&relay_0, &relay_2] {
        let out = node.on_frame(frame, t0).unwrap();
        assert_eq!(ack_code(&out), AckCode::Duplicate);
        assert_eq!(ack_states(&out).bits, 0b0100);
    }
    assert_eq!(node.states().bits, 0b0100);
}

/// Carries every frame between a master and a slave, in order, until neither has more to say;
/// returns what the master published on the way.
fn exchange(
    core: &mut MasterCore,
    node: &mut SlaveNode,
    outputs: Outputs,
    now: Instant,
) -> Outputs {
    let mut published = Vec::new();
    let mut to_slave: std::collections::VecDeque<Output> = outputs.into();
    while let Some(output) = to_slave.pop_front() {
        match output {
            Output::Frame { bytes, .. } => {
                for reply in node.on_frame(&bytes, now).unwrap() {
                    let reply = reply.to_bytes().unwrap();
                    to_slave.extend(core.on_radio(slave_mac(), &reply, now));
                }
            }
            other => published.push(other),
        }
    }
    published
}

type Outputs = Vec<Output>;

#[test]
fn a_master_acks_a_command_for_two_relays_with_both_relays_on() {
    let t0 = Instant::now();
    let mut core = master_core();
    let (mut node, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    let mut signer = CommandSigner::new(key(), 1);
    let mut both = command(9);
    both.actions = vec![
        RelayAction {
            relay: 0,
            action: SwitchAction::On,
            duration_s: 30,
        },
        RelayAction {
            relay: 2,
            action: SwitchAction::On,
            duration_s: 30,
        },
    ];
    let sealed = signer.seal(both.clone());
    let out = core.on_mqtt(&command_topic(), &sealed.encode().unwrap(), t0, NOW_MS);
    assert_eq!(frames(&out).len(), 2, "one frame per relay");
    let published = exchange(&mut core, &mut node, out, t0);
    let done = acks(&published);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, AckResult::Completed);
    assert_eq!(done[0].relay_states, vec![true, false, true, false]);
    assert_eq!(node.states().bits, 0b0101);

    // Signed again (same id, new counter): a duplicate, nothing switched twice.
    let again = signer.seal(both);
    let out = core.on_mqtt(&command_topic(), &again.encode().unwrap(), t0, NOW_MS);
    assert!(frames(&out).is_empty());
    let done = acks(&out);
    assert_eq!(done[0].result, AckResult::Duplicate);
    assert_eq!(done[0].relay_states, vec![true, false, true, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delaying_radio_keeps_every_frame_in_order() {
    // A master's frames to a slave, and several slaves' frames to their master, cross the air
    // in the order they were sent; the master relies on it to take a slave's states from the
    // newest frame. (Delaying each frame on its own timer let later frames overtake earlier
    // ones, so a command for relays 0 and 2 was acked with relay 0 off.)
    let delay = Duration::from_millis(2);
    let radio = Radio::new(RadioSpec {
        loss_percent: 0,
        delay_ms: 2,
    });
    let (link, mut rx) = radio.channel();
    let started = Instant::now();
    let senders: Vec<MacAddr> = (1..=3u8).map(|i| MacAddr([2, 0, 0, 0, 0, i])).collect();
    for n in 0..60u8 {
        // Clones of one link, as every slave holds a clone of its master's.
        let from = senders[usize::from(n) % senders.len()];
        link.clone().transmit(from, &[n]);
        if n % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut received = Vec::new();
    while received.len() < 60 {
        let (from, bytes) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("every frame arrives")
            .expect("the link is open");
        assert_eq!(from, senders[usize::from(bytes[0]) % senders.len()]);
        received.push(bytes[0]);
    }
    assert!(started.elapsed() >= delay, "the radio delays frames");
    assert_eq!(received, (0..60u8).collect::<Vec<_>>());
}

fn frame_bytes(outputs: &[Output]) -> Vec<Vec<u8>> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Frame { bytes, .. } => Some(bytes.to_vec()),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_withdrawn_frame_never_lands_and_later_frames_still_do() {
    let radio = Radio::new(RadioSpec {
        loss_percent: 0,
        delay_ms: 1_500,
    });
    let (link, mut rx) = radio.channel();
    link.transmit(slave_mac(), &relay_command(1, 0, SwitchAction::On, 0));
    link.transmit(slave_mac(), &heartbeat());
    tokio::time::advance(Duration::from_millis(500)).await;
    let taken = link.withdraw(|b| b == relay_command(1, 0, SwitchAction::On, 0).as_slice());
    assert_eq!(taken.len(), 1);
    link.transmit(slave_mac(), &bytes(FrameBody::EmergencyStop, 9, true));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let landed: Vec<FrameRepr> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|(_, b)| FrameRepr::from_bytes(&b).unwrap())
        .collect();
    assert_eq!(landed.len(), 2, "{landed:?}");
    assert!(
        landed
            .iter()
            .all(|f| !matches!(f.body, FrameBody::RelayCommand { .. }))
    );
    assert_eq!(landed[1].body, FrameBody::EmergencyStop);
}

#[test]
fn a_latching_master_withdraws_what_it_queued_and_fails_what_never_left() {
    let t0 = Instant::now();
    let mut core = master_core();
    let sealed = CommandSigner::new(key(), 1).seal(command(5));
    let sent = core.on_mqtt(&command_topic(), &sealed.encode().unwrap(), t0, NOW_MS);
    let queued = frame_bytes(&sent);
    assert!(!queued.is_empty());
    let out = core.on_mqtt("autocore/emergency/stop", b"{\"v\":1}", t0, NOW_MS);
    // The withdrawal comes before the stop frame, so the stop goes ahead of what was queued.
    let withdraw_at = out
        .iter()
        .position(|o| matches!(o, Output::Withdraw { command: None, .. }))
        .expect("a latching master withdraws what it queued");
    let stop_at = out
        .iter()
        .position(|o| matches!(o, Output::Frame { .. }))
        .unwrap();
    assert!(withdraw_at < stop_at);
    assert!(
        acks(&out).is_empty(),
        "nothing is reported before the radio answers"
    );
    // The radio took the command's frames back before they left: it never ran.
    let out = core.on_withdrawn(slave_mac(), &queued, t0 + Duration::from_millis(5));
    let ended = acks(&out);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].result, AckResult::Failed);
    assert_eq!(
        ended[0].error.as_ref().unwrap().code,
        AckErrorCode::EmergencyLatched
    );
    // And it is never sent again.
    for step in 1..10u64 {
        let out = core.on_retry_tick(t0 + Duration::from_millis(200 * step));
        assert!(frames(&out).is_empty());
        assert!(acks(&out).is_empty());
    }
}

#[test]
fn a_master_that_gives_up_withdraws_the_copies_still_queued_before_reporting_failed() {
    let t0 = Instant::now();
    let mut core = master_core();
    let sealed = CommandSigner::new(key(), 1).seal(command(5));
    core.on_mqtt(&command_topic(), &sealed.encode().unwrap(), t0, NOW_MS);
    let timing = MasterTiming::default();
    for step in 1..=timing.frame_attempts_max + 1 {
        let out = core.on_retry_tick(
            t0 + Duration::from_millis(timing.frame_ack_timeout_ms * u64::from(step)),
        );
        if let Some(ack_at) = out.iter().position(|o| {
            matches!(
                o,
                Output::Publish {
                    topic: Topic::Ack(_),
                    ..
                }
            )
        }) {
            let withdraw_at = out
                .iter()
                .position(|o| matches!(o, Output::Withdraw { command: Some(id), .. } if id.backend_id() == Some(5)))
                .expect("the queued copies are withdrawn");
            assert!(
                withdraw_at < ack_at,
                "withdrawn before the failure is reported"
            );
            return;
        }
    }
    panic!("the command never failed");
}

// ---------------------------------------------------------------------------------------------
// a master that reboots between accepting a command and its slave's confirmation

fn persisted(outputs: &[Output]) -> MasterState {
    outputs
        .iter()
        .rev()
        .find_map(|o| match o {
            Output::Persist(state) => Some(state.clone()),
            _ => None,
        })
        .expect("the master persisted its state")
}

fn rebooted(state: MasterState) -> MasterCore {
    let spec = MasterSpec {
        id: master(),
        key: key(),
        slaves: vec![slave_spec(0, &[])],
        sensors: vec![],
    };
    MasterCore::new(&spec, MasterTiming::default(), state)
}

/// Sends the master's frames to the slave and the slave's answers back; returns the acks.
fn over_the_radio(
    core: &mut MasterCore,
    node: &mut SlaveNode,
    out: &[Output],
    t: Instant,
) -> Vec<CommandAck> {
    let mut acks_out = Vec::new();
    for o in out {
        if let Output::Frame { bytes, .. } = o {
            for answer in node.on_frame(bytes, t).unwrap() {
                let back = core.on_radio(slave_mac(), &answer.to_bytes().unwrap(), t);
                acks_out.extend(acks(&back));
            }
        }
    }
    acks_out
}

/// A slave and a master with no history, and what the master did with command 5 (its frames).
fn command_5_sent_to_a_fresh_master() -> (Instant, SlaveNode, CommandSigner, MasterCore, Vec<Output>)
{
    let t0 = Instant::now();
    let (node, _) = SlaveNode::boot(&slave_spec(0, &[]), SILENT, false, t0);
    let mut signer = CommandSigner::new(key(), 1);
    let mut core = master_core();
    let first = core.on_mqtt(
        &command_topic(),
        &signer.seal(command(5)).encode().unwrap(),
        t0,
        NOW_MS,
    );
    (t0, node, signer, core, first)
}

#[test]
fn a_master_rebooted_before_its_slave_confirmed_runs_the_resend_instead_of_calling_it_duplicate() {
    let (t0, mut node, mut signer, _, first) = command_5_sent_to_a_fresh_master();
    assert_eq!(frames(&first).len(), 1, "forwarded once");
    // Killed before the frame left: the slave never saw it.
    let mut core = rebooted(persisted(&first));
    let resend = core.on_mqtt(
        &command_topic(),
        &signer.seal(command(5)).encode().unwrap(),
        t0,
        NOW_MS,
    );
    assert!(
        acks(&resend).is_empty(),
        "no `duplicate` for a command no slave confirmed: {:?}",
        acks(&resend)
    );
    let acked = over_the_radio(&mut core, &mut node, &resend, t0);
    assert_eq!(acked.len(), 1);
    assert_eq!(acked[0].result, AckResult::Completed);
    assert!(node.states().is_on(0), "the resend ran: the relay is on");
    assert!(acked[0].relay_states[0]);
}

#[test]
fn a_master_rebooted_after_its_slave_applied_answers_duplicate_with_the_switch_that_happened() {
    let (t0, mut node, mut signer, _, first) = command_5_sent_to_a_fresh_master();
    // The slave applied it; the master died before its ack arrived.
    for o in &first {
        if let Output::Frame { bytes, .. } = o {
            node.on_frame(bytes, t0).unwrap();
        }
    }
    assert!(node.states().is_on(0));
    let mut core = rebooted(persisted(&first));
    let resend = core.on_mqtt(
        &command_topic(),
        &signer.seal(command(5)).encode().unwrap(),
        t0,
        NOW_MS,
    );
    assert!(
        acks(&resend).is_empty(),
        "the slave is asked, not the master's memory"
    );
    let acked = over_the_radio(&mut core, &mut node, &resend, t0);
    assert_eq!(acked.len(), 1);
    assert_eq!(
        acked[0].result,
        AckResult::Duplicate,
        "applied once, by the first copy"
    );
    assert!(
        acked[0].relay_states[0],
        "the duplicate carries the switch that happened"
    );
    // Confirmed now: a third copy is answered from the master's memory without the radio.
    let third = core.on_mqtt(
        &command_topic(),
        &signer.seal(command(5)).encode().unwrap(),
        t0,
        NOW_MS,
    );
    assert!(frames(&third).is_empty());
    assert_eq!(acks(&third)[0].result, AckResult::Duplicate);
}

/// A resend of a command that already ran, arriving after its expiry (the agent lost the first
/// ack in a restart), is answered `duplicate` with the switch that happened: `expired` would
/// tell the agent it never ran.
#[test]
fn a_command_that_ran_is_answered_duplicate_even_when_its_resend_comes_after_the_expiry() {
    let (t0, mut node, mut signer, mut core, first) = command_5_sent_to_a_fresh_master();
    let acked = over_the_radio(&mut core, &mut node, &first, t0);
    assert_eq!(acked[0].result, AckResult::Completed);
    let expiry = command(5).expires_at_ms;
    let late = core.on_mqtt(
        &command_topic(),
        &signer.seal(command(5)).encode().unwrap(),
        t0,
        expiry + 5_000,
    );
    assert!(frames(&late).is_empty(), "nothing runs again");
    let answer = &acks(&late)[0];
    assert_eq!(answer.result, AckResult::Duplicate, "it ran, once");
    assert!(answer.relay_states[0], "with the switch that happened");
}

// ---------------------------------------------------------------------------------------------
// the MQTT heartbeat

fn status_publications(outputs: &[Output]) -> usize {
    outputs
        .iter()
        .filter(|o| {
            matches!(
                o,
                Output::Publish {
                    topic: Topic::Status(_),
                    ..
                }
            )
        })
        .count()
}

#[test]
fn a_master_publishes_its_status_online_every_ten_seconds_whatever_else_it_sends() {
    let mut core = master_core();
    let t0 = Instant::now();
    // Not before it is connected: a status could overtake its subscriptions.
    assert_eq!(status_publications(&core.on_heartbeat(t0)), 0);
    assert_eq!(status_publications(&core.on_connected()), 1);
    let mut published = 0;
    // Heartbeat ticks every second for 35 s after connecting: at 10, 20 and 30 s.
    for s in 1..=36 {
        let out = core.on_heartbeat(t0 + Duration::from_secs(s));
        published += status_publications(&out);
        if s > 1 && (s - 1) % 10 == 0 {
            assert_eq!(status_publications(&out), 1, "a status at {s} s");
        }
    }
    assert_eq!(published, 3);
}

#[tokio::test]
async fn a_controlled_radio_follows_its_control_while_it_runs() {
    use firmware_protocol::sim::RadioControl;
    let control = RadioControl::new(RadioSpec {
        loss_percent: 100,
        delay_ms: 0,
    });
    let (link, mut rx) = Radio::controlled(control.clone()).channel();
    link.transmit(slave_mac(), &heartbeat());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rx.try_recv().is_err(), "all frames lost");

    control.set(RadioSpec {
        loss_percent: 0,
        delay_ms: 30,
    });
    let sent = Instant::now();
    link.transmit(slave_mac(), &heartbeat());
    let (_, bytes) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bytes, heartbeat());
    assert!(sent.elapsed() >= Duration::from_millis(30), "delayed");
}
