//! The store's promises: nothing accepted twice, nothing finished twice, reports queued with
//! the state change, bounded outbox that drops only telemetry, counters that never go back.

use serde_json::json;

use super::*;

pub(super) fn command(id: i64) -> CommandRecord {
    CommandRecord {
        id,
        master_device_id: "ESP32_A".into(),
        slave_mac_address: "14:33:5C:38:BF:60".into(),
        slave_device_id: None,
        actions: crate::command::actions_from_columns(&[0], &["on".into()], &[60]).unwrap(),
        command_type: crate::command::CommandType::Manual,
        triggered_by: crate::command::CommandSource::Manual,
        priority: 10,
        rule_id: None,
        rule_name: None,
        expires_at_ms: 1_000_000,
        state: CommandState::Accepted,
        attempts: 0,
        last_sent_at_ms: None,
        polled_by: None,
    }
}

fn reading(sensor: &str, at: i64) -> Reading {
    Reading {
        device_id: "ESP32_A".into(),
        sensor_key: sensor.into(),
        value: 6.5,
        unit: Some("pH".into()),
        recorded_at_ms: at,
        received_at_ms: None,
    }
}

#[test]
fn a_command_handed_out_twice_is_accepted_once() {
    let mut store = Store::open_in_memory().unwrap();
    assert_eq!(store.accept_command(&command(7), 1).unwrap(), Accepted::New);
    store.mark_sent(7, Some(1), None, 2).unwrap();
    assert_eq!(
        store.accept_command(&command(7), 3).unwrap(),
        Accepted::Known(CommandState::Sent)
    );
    assert_eq!(store.open_commands().unwrap().len(), 1);
    assert_eq!(store.command(7).unwrap().unwrap().attempts, 1);
}

#[test]
fn finishing_a_command_queues_its_completion_once() {
    let mut store = Store::open_in_memory().unwrap();
    store.accept_command(&command(7), 1).unwrap();
    let done = CommandOutcome::Completed {
        execution_time_ms: 42,
        relay_states: Some(vec![true, false]),
    };
    assert!(store.finish_command(7, &done, 5).unwrap());
    assert!(
        !store.finish_command(7, &done, 6).unwrap(),
        "a duplicate ack changes nothing"
    );
    let due = store.outbox_due(10, 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].class, OutboxClass::Completion);
    assert_eq!(due[0].payload["status"], "completed");
    assert_eq!(due[0].payload["execution_time_ms"], 42);
    assert!(store.open_commands().unwrap().is_empty());
}

#[test]
fn an_expired_command_is_reported_as_expired_and_never_reopened() {
    let mut store = Store::open_in_memory().unwrap();
    store.accept_command(&command(8), 1).unwrap();
    assert!(
        store
            .finish_command(8, &CommandOutcome::Expired, 2)
            .unwrap()
    );
    assert_eq!(
        store.accept_command(&command(8), 3).unwrap(),
        Accepted::Known(CommandState::Expired)
    );
    assert_eq!(
        store.outbox_due(10, 10).unwrap()[0].payload["status"],
        "expired"
    );
}

#[test]
fn accepted_commands_outbox_rows_and_counters_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    {
        let mut store = Store::open(&path).unwrap();
        store.accept_command(&command(1), 1).unwrap();
        store
            .enqueue(OutboxClass::Event, "e1", &json!({"x": 1}), 1)
            .unwrap();
        assert_eq!(store.next_signing_counter("ESP32_A", 1).unwrap(), 1);
        assert_eq!(store.next_signing_counter("ESP32_A", 1).unwrap(), 2);
    }
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.open_commands().unwrap()[0].id, 1);
    assert_eq!(store.outbox_stats(2).unwrap().depth, 1);
    assert_eq!(
        store.next_signing_counter("ESP32_A", 1).unwrap(),
        3,
        "the counter never goes back"
    );
}

#[test]
fn the_outbox_bound_drops_the_oldest_telemetry_and_nothing_else() {
    let mut store = Store::open_in_memory().unwrap();
    store.accept_command(&command(1), 0).unwrap();
    store
        .finish_command(
            1,
            &CommandOutcome::Failed {
                reason: "no ack".into(),
                execution_time_ms: None,
            },
            0,
        )
        .unwrap();
    let readings: Vec<Reading> = (0..10).map(|i| reading("ph", i)).collect();
    assert_eq!(store.enqueue_readings(&readings, 1).unwrap(), 10);
    assert_eq!(
        store.enqueue_readings(&readings, 1).unwrap(),
        0,
        "re-queued readings are skipped"
    );
    store
        .enqueue(OutboxClass::Event, "ev", &json!({}), 2)
        .unwrap();
    assert_eq!(store.enforce_outbox_bound(5).unwrap().lost, 7);
    let due = store.outbox_due(10, 100).unwrap();
    let classes: Vec<OutboxClass> = due.iter().map(|r| r.class).collect();
    assert_eq!(
        classes,
        vec![
            OutboxClass::Completion,
            OutboxClass::Telemetry,
            OutboxClass::Telemetry,
            OutboxClass::Telemetry,
            OutboxClass::Event
        ]
    );
    assert_eq!(
        due[1].payload["recorded_at_ms"], 7,
        "the oldest readings went first"
    );
    assert_eq!(store.counter("telemetry_dropped").unwrap(), 7);

    // With no telemetry left to drop, the bound does not touch completions or events.
    assert_eq!(store.enforce_outbox_bound(1).unwrap().lost, 3);
    assert_eq!(store.outbox_stats(10).unwrap().depth, 2);
}

/// A push that got no answer may have reached the backend: its readings are not dropped as lost
/// while readings that certainly never left remain, and a push under way is never dropped, so
/// `telemetry_dropped` counts exactly what the backend is missing.
#[test]
fn the_bound_drops_what_certainly_never_left_before_what_may_have_arrived() {
    let mut store = Store::open_in_memory().unwrap();
    let readings: Vec<Reading> = (0..10).map(|i| reading("ph", i)).collect();
    store.enqueue_readings(&readings, 1).unwrap();
    // The oldest three were pushed and no answer came back.
    let unanswered: Vec<i64> = store
        .outbox_take_for_push(10, 3)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    store
        .outbox_retry_later(&unanswered, "timeout", 0, true)
        .unwrap();
    // The oldest five are being pushed again right now; the last five were never sent.
    store.outbox_take_for_push(10, 5).unwrap();
    let drops = store.enforce_outbox_bound(4).unwrap();
    assert_eq!(
        drops,
        OutboxDrops {
            lost: 5,
            in_doubt: 0
        }
    );
    let left: Vec<i64> = store
        .outbox_due(10, 100)
        .unwrap()
        .iter()
        .map(|r| r.payload["recorded_at_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(left, vec![0, 1, 2, 3, 4], "in doubt and under way kept");
    assert_eq!(store.counter("telemetry_dropped").unwrap(), 5);

    // Once the push is settled (the next take hands out nothing), the rows under way that
    // failed plainly are dropped as lost before the ones in doubt.
    store.outbox_take_for_push(-1, 5).unwrap();
    let drops = store.enforce_outbox_bound(3).unwrap();
    assert_eq!(
        drops,
        OutboxDrops {
            lost: 2,
            in_doubt: 0
        }
    );
    // Only readings in doubt left: dropped, and counted apart.
    let drops = store.enforce_outbox_bound(1).unwrap();
    assert_eq!(
        drops,
        OutboxDrops {
            lost: 0,
            in_doubt: 2
        }
    );
    assert_eq!(store.counter("telemetry_dropped").unwrap(), 7);
    assert_eq!(store.counter("telemetry_dropped_in_doubt").unwrap(), 2);
    // A plain failure later does not clear the doubt an unanswered push left.
    let last = store.outbox_due(10, 1).unwrap()[0].seq;
    store.outbox_retry_later(&[last], "503", 0, false).unwrap();
    let in_doubt: i64 = store
        .conn
        .query_row("select in_doubt from outbox where seq = ?1", [last], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(in_doubt, 1);
}

#[test]
fn a_rejected_row_leaves_the_queue_but_is_kept_with_its_reason() {
    let mut store = Store::open_in_memory().unwrap();
    store
        .enqueue(OutboxClass::Event, "bad", &json!({"x": 1}), 1)
        .unwrap();
    let seq = store.outbox_due(1, 1).unwrap()[0].seq;
    store.outbox_reject(seq, "400: violates check", 2).unwrap();
    let stats = store.outbox_stats(3).unwrap();
    assert_eq!((stats.depth, stats.rejected), (0, 1));
}

#[test]
fn a_row_retried_later_is_not_due_before_its_time() {
    let mut store = Store::open_in_memory().unwrap();
    store
        .enqueue(OutboxClass::Event, "e", &json!({}), 1)
        .unwrap();
    let seq = store.outbox_due(1, 1).unwrap()[0].seq;
    store.outbox_retry_later(&[seq], "503", 100, false).unwrap();
    assert!(store.outbox_due(99, 10).unwrap().is_empty());
    assert_eq!(store.outbox_due(100, 10).unwrap()[0].attempts, 1);
}

#[test]
fn completions_leave_the_outbox_ahead_of_older_rows() {
    let mut store = Store::open_in_memory().unwrap();
    store
        .enqueue_readings(&[reading("ph", 1), reading("ph", 2)], 1)
        .unwrap();
    assert!(!store.completions_waiting(10).unwrap());
    store.accept_command(&command(7), 1).unwrap();
    store
        .finish_command(
            7,
            &CommandOutcome::Completed {
                execution_time_ms: 5,
                relay_states: None,
            },
            3,
        )
        .unwrap();
    assert!(store.completions_waiting(10).unwrap());
    let due = store.outbox_due(10, 10).unwrap();
    assert_eq!(due[0].class, OutboxClass::Completion, "{due:?}");
    // Backing off after a failure: it no longer holds up new locks.
    store
        .outbox_retry_later(&[due[0].seq], "503", 1_000, false)
        .unwrap();
    assert!(!store.completions_waiting(10).unwrap());
    assert!(store.completions_waiting(1_000).unwrap());
    store.outbox_delivered(&[due[0].seq]).unwrap();
    assert!(!store.completions_waiting(1_000).unwrap());
}

#[test]
fn when_an_outage_ends_every_row_backing_off_is_due_at_once() {
    let mut store = Store::open_in_memory().unwrap();
    for key in ["a", "b"] {
        store
            .enqueue(OutboxClass::Event, key, &json!({}), 1)
            .unwrap();
    }
    let seqs: Vec<i64> = store
        .outbox_due(1, 10)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    // Far in the future: the backoff after many failures during the outage.
    store
        .outbox_retry_later(&seqs, "timeout", 10_000_000, true)
        .unwrap();
    assert!(store.outbox_due(2, 10).unwrap().is_empty());
    assert_eq!(store.outbox_due_now().unwrap(), 2);
    let due = store.outbox_due(2, 10).unwrap();
    assert_eq!(due.len(), 2, "due at once; their attempts kept: {due:?}");
    assert!(due.iter().all(|r| r.attempts == 1));
}

fn rule(revision: i64, enabled: bool, deleted: bool) -> RuleRecord {
    RuleRecord {
        id: "r1".into(),
        device_id: "ESP32_A".into(),
        rule_id: "RULE_001".into(),
        rule_name: Some("ph low".into()),
        rule_description: None,
        rule_json: Some(json!({"conditions": {}, "actions": []})),
        enabled,
        priority: 50,
        cooldown_seconds: 60,
        max_executions_per_hour: 10,
        revision,
        deleted,
        changed_at: format!("2026-11-22T00:00:0{revision}Z"),
    }
}

#[test]
fn the_rules_mirror_keeps_the_newest_revision_and_learns_of_deletions() {
    let mut store = Store::open_in_memory().unwrap();
    store.apply_rule_changes(&[rule(1, true, false)]).unwrap();
    assert_eq!(store.active_rules("ESP32_A", 10).unwrap().len(), 1);
    store.apply_rule_changes(&[rule(2, false, false)]).unwrap();
    assert!(
        store.active_rules("ESP32_A", 10).unwrap().is_empty(),
        "disabled"
    );
    assert_eq!(
        store.apply_rule_changes(&[rule(1, true, false)]).unwrap(),
        0,
        "an older revision read again in the overlap is ignored"
    );
    assert!(store.active_rules("ESP32_A", 10).unwrap().is_empty());
    let mut tombstone = rule(3, false, true);
    tombstone.rule_json = None;
    store.apply_rule_changes(&[tombstone]).unwrap();
    let kept = store.rule("r1").unwrap().unwrap();
    assert!(kept.deleted);
    assert!(
        kept.rule_json.is_some(),
        "a tombstone keeps the last known body"
    );
}

#[test]
fn a_master_seen_for_the_first_time_is_reported_as_new() {
    let mut store = Store::open_in_memory().unwrap();
    assert!(
        store
            .record_presence("ESP32_A", true, Some("1.2.0"), Some(-60), 1)
            .unwrap()
    );
    assert!(
        !store
            .record_presence("ESP32_A", false, None, None, 2)
            .unwrap()
    );
    assert_eq!(
        store.devices().unwrap(),
        vec![("ESP32_A".to_string(), false, Some(2))]
    );
}

#[test]
fn a_master_silent_past_the_cutoff_goes_offline_once() {
    let mut store = Store::open_in_memory().unwrap();
    store.record_presence("A", true, None, None, 1_000).unwrap();
    store.record_presence("B", true, None, None, 5_000).unwrap();
    assert_eq!(
        store.mark_silent_offline(2_000).unwrap(),
        vec!["A".to_string()]
    );
    assert!(
        store.mark_silent_offline(2_000).unwrap().is_empty(),
        "already offline"
    );
}

#[test]
fn a_master_heard_only_through_telemetry_is_not_marked_silent() {
    let mut store = Store::open_in_memory().unwrap();
    store.record_presence("A", true, None, None, 1_000).unwrap();
    store
        .record_presence("B", false, None, None, 1_000)
        .unwrap();
    store
        .note_heard(&[("A".into(), 9_000), ("B".into(), 9_000)])
        .unwrap();
    assert!(
        store.mark_silent_offline(5_000).unwrap().is_empty(),
        "A was heard at 9 s"
    );
    // Never back in time, and never online again by a heard time alone.
    store.note_heard(&[("A".into(), 2_000)]).unwrap();
    let devices = store.devices().unwrap();
    assert_eq!(
        devices,
        vec![
            ("A".to_string(), true, Some(9_000)),
            ("B".to_string(), false, Some(1_000))
        ]
    );
}

#[test]
fn the_delivered_config_version_is_remembered() {
    let mut store = Store::open_in_memory().unwrap();
    assert_eq!(store.delivered_config_version("A").unwrap(), None);
    store.set_delivered_config_version("A", 3).unwrap();
    assert_eq!(store.delivered_config_version("A").unwrap(), Some(3));
}

#[test]
fn a_full_disk_is_a_clear_error_and_loses_nothing_already_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    let mut store = Store::open(&path).unwrap();
    store.accept_command(&command(1), 1).unwrap();
    // SQLite reports SQLITE_FULL when the database may not grow: the same error a full SD card
    // gives, without filling the machine's disk.
    let pages: i64 = store
        .conn
        .query_row("pragma page_count", [], |r| r.get(0))
        .unwrap();
    store
        .conn
        .execute_batch(&format!("pragma max_page_count = {}", pages + 2))
        .unwrap();
    let mut failure = None;
    for batch in 0..200 {
        let readings: Vec<Reading> = (0..100).map(|i| reading("ph", batch * 100 + i)).collect();
        if let Err(e) = store.enqueue_readings(&readings, 2) {
            failure = Some(e);
            break;
        }
    }
    let error = failure.expect("the database filled up");
    assert!(
        error.to_string().contains("full"),
        "the error says so: {error}"
    );
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.open_commands().unwrap().len(),
        1,
        "the accepted command survived"
    );
}

fn edge_command(id: i64) -> CommandRecord {
    CommandRecord {
        command_type: crate::command::CommandType::Rule,
        triggered_by: crate::command::CommandSource::Rule,
        priority: 50,
        rule_id: Some("RULE_001".into()),
        rule_name: Some("pH low".into()),
        ..command(id)
    }
}

fn relay_entry(relay: u8, since_ms: i64) -> crate::safety::RelayEntry {
    crate::safety::RelayEntry {
        relay: crate::safety::RelayRef::new("ESP32_A", "14:33:5C:38:BF:60", relay),
        state: crate::safety::RelayState::Off { since_ms },
    }
}

/// The arbiter's state is written a relay at a time: each step writes what changed, and what
/// is read back at a start is the whole of it.
#[test]
fn the_arbiters_relays_are_written_as_they_change_and_read_back_whole() {
    use crate::safety::{SafetyDelta, SafetySnapshot};
    let mut store = Store::open_in_memory().unwrap();
    assert_eq!(
        store.safety_snapshot().unwrap(),
        None,
        "nothing written yet"
    );
    let step = |safety: SafetyDelta| AutomationWrite {
        safety: Some(safety),
        ..Default::default()
    };
    store
        .write_automation(
            &step(SafetyDelta {
                replace_all: true,
                changed: vec![relay_entry(0, 1), relay_entry(1, 1), relay_entry(2, 1)],
                ..Default::default()
            }),
            1,
        )
        .unwrap();
    let latch = crate::safety::EmergencyLatch {
        reason: "test".into(),
        by: "operator".into(),
        since_ms: 9,
    };
    store
        .write_automation(
            &step(SafetyDelta {
                changed: vec![relay_entry(1, 7)],
                removed: vec![relay_entry(2, 1).relay],
                emergency: Some(latch.clone()),
                ..Default::default()
            }),
            2,
        )
        .unwrap();
    let read: SafetySnapshot =
        serde_json::from_value(store.safety_snapshot().unwrap().unwrap()).unwrap();
    assert_eq!(
        read,
        SafetySnapshot {
            relays: vec![relay_entry(0, 1), relay_entry(1, 7)],
            emergency: Some(latch),
        }
    );
    // Replacing forgets what the earlier writes left.
    store
        .write_automation(
            &step(SafetyDelta {
                replace_all: true,
                changed: vec![relay_entry(3, 4)],
                ..Default::default()
            }),
            3,
        )
        .unwrap();
    let read: SafetySnapshot =
        serde_json::from_value(store.safety_snapshot().unwrap().unwrap()).unwrap();
    assert_eq!(read.relays, vec![relay_entry(3, 4)]);
    assert_eq!(read.emergency, None);
}

#[test]
fn a_firing_is_written_whole_and_its_command_reports_the_cloud_row_when_it_ends() {
    let mut store = Store::open_in_memory().unwrap();
    let write = AutomationWrite {
        commands: vec![(
            edge_command(-1),
            "6f1c1d1e-0000-5000-8000-000000000001".into(),
        )],
        rule_states: vec![("rule-a".into(), json!({"last_fired_ms": 10}))],
        safety: Some(crate::safety::SafetyDelta {
            replace_all: true,
            changed: vec![relay_entry(2, 5)],
            removed: vec![],
            emergency: None,
        }),
        outbox: vec![OutboxEntry {
            class: OutboxClass::RuleFeedback,
            idempotency_key: "execution:1".into(),
            payload: json!({"kind": "execution"}),
        }],
        send_now: vec![],
        cursors: vec![],
    };
    store.write_automation(&write, 10).unwrap();
    assert_eq!(store.last_edge_command_number().unwrap(), 1);
    assert_eq!(
        store.rule_states().unwrap()["rule-a"],
        json!({"last_fired_ms": 10})
    );
    assert_eq!(
        store.safety_snapshot().unwrap(),
        Some(json!({"emergency": null, "relays": [relay_entry(2, 5)]}))
    );
    assert_eq!(
        store.command(-1).unwrap().unwrap().state,
        CommandState::Accepted
    );
    // Nothing about the command reaches the cloud while it runs: a master polling the cloud
    // must never find it pending.
    let before = store.outbox_due(i64::MAX, 100).unwrap();
    assert!(before.iter().all(|r| r.class != OutboxClass::RuleCommand));

    let done = CommandOutcome::Completed {
        execution_time_ms: 40,
        relay_states: Some(vec![true]),
    };
    assert!(store.finish_command(-1, &done, 20).unwrap());
    assert!(!store.finish_command(-1, &done, 21).unwrap(), "ends once");
    let rows = store.outbox_due(i64::MAX, 100).unwrap();
    let reports: Vec<_> = rows
        .iter()
        .filter(|r| r.class == OutboxClass::RuleCommand)
        .collect();
    assert_eq!(reports.len(), 1);
    let p = &reports[0].payload;
    assert_eq!(p["status"], "completed");
    assert_eq!(p["command_type"], "rule");
    assert_eq!(p["rule_id"], "RULE_001");
    assert_eq!(p["client_id"], "6f1c1d1e-0000-5000-8000-000000000001");
    assert!(rows.iter().all(|r| r.class != OutboxClass::Completion));
}

#[test]
fn edge_numbers_never_go_back_even_without_the_counter_row() {
    let mut store = Store::open_in_memory().unwrap();
    let write = AutomationWrite {
        commands: vec![(edge_command(-7), "c7".into())],
        ..AutomationWrite::default()
    };
    store.write_automation(&write, 1).unwrap();
    store
        .conn
        .execute(
            "delete from counters where name = 'edge_command_number'",
            [],
        )
        .unwrap();
    assert_eq!(store.last_edge_command_number().unwrap(), 7);
}

#[test]
fn a_rule_problem_is_reported_once_per_revision_and_reason() {
    let mut store = Store::open_in_memory().unwrap();
    assert!(
        !store.note_rule_problem("r", 1, None, 1).unwrap(),
        "a fine rule needs no report"
    );
    assert!(
        store
            .note_rule_problem("r", 1, Some("bad operator"), 2)
            .unwrap()
    );
    assert!(
        !store
            .note_rule_problem("r", 1, Some("bad operator"), 3)
            .unwrap()
    );
    assert!(
        store.note_rule_problem("r", 2, None, 4).unwrap(),
        "fixed: the error is cleared"
    );
    let reports: Vec<_> = store
        .outbox_due(i64::MAX, 100)
        .unwrap()
        .into_iter()
        .filter(|r| r.class == OutboxClass::RuleFeedback)
        .map(|r| r.payload)
        .collect();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0]["error"], "bad operator");
    assert_eq!(reports[1]["error"], serde_json::Value::Null);
}

#[test]
fn readings_are_kept_for_replay_with_their_arrival_time() {
    let mut store = Store::open_in_memory().unwrap();
    store
        .enqueue_readings(
            &[
                reading("ph", 1_000),
                reading("ec", 2_000),
                Reading {
                    received_at_ms: Some(13_000),
                    ..reading("ph", 3_000)
                },
            ],
            5,
        )
        .unwrap();
    let kept = store.readings_between("ESP32_A", 0, 10_000).unwrap();
    assert_eq!(
        kept.iter()
            .map(|r| (r.sensor_key.as_str(), r.recorded_at_ms, r.received_at_ms))
            .collect::<Vec<_>>(),
        vec![
            ("ph", 1_000, None),
            ("ec", 2_000, None),
            ("ph", 3_000, Some(13_000))
        ],
        "the arrival time is kept for replay"
    );
    // Pruning: store/history/tests.rs.
}

#[test]
fn relay_counts_come_from_the_slaves_last_reports() {
    let mut store = Store::open_in_memory().unwrap();
    let slaves = vec![
        ("14:33:5C:38:BF:60".to_string(), vec![false; 4]),
        ("14:33:5C:38:BF:61".to_string(), vec![true; 8]),
    ];
    store
        .record_relay_report("ESP32_A", &slaves, &json!({"slaves": []}), 1)
        .unwrap();
    let counts = store.relay_counts().unwrap();
    assert_eq!(counts[&("ESP32_A".into(), "14:33:5C:38:BF:60".into())], 4);
    assert_eq!(counts[&("ESP32_A".into(), "14:33:5C:38:BF:61".into())], 8);
    let queued = store.outbox_due(i64::MAX, 10).unwrap();
    assert_eq!(
        queued.len(),
        1,
        "the report is queued for the cloud with the states"
    );
    assert_eq!(queued[0].class, OutboxClass::RelayState);
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

#[test]
fn a_new_database_and_the_directory_the_agent_creates_for_it_are_private_to_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var").join("autocore");
    let db = data.join("agent.db");
    let _store = Store::open(&db).unwrap();
    assert_eq!(mode(&data), 0o700);
    for file in [db.clone(), sibling(&db, "-wal"), sibling(&db, "-shm")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[test]
fn an_existing_database_that_others_can_read_is_made_private_when_opened() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agent.db");
    drop(Store::open(&db).unwrap());
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = Store::open(&db).unwrap();
    for file in [db.clone(), sibling(&db, "-wal"), sibling(&db, "-shm")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[test]
fn opening_an_existing_database_never_creates_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("missing").join("agent.db");
    match Store::open_existing(&db) {
        Err(StoreError::Missing(path)) => assert_eq!(path, db),
        other => panic!("expected Missing, got {other:?}"),
    }
    assert!(!db.parent().unwrap().exists());
}

#[test]
fn many_connections_opening_a_new_database_at_once_all_succeed() {
    // The agent, `status`, `rules test` and tests open the same file: none may fail because
    // another is switching it to WAL or migrating it at that moment.
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let opened: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    Store::open(&path).map(|_| ())
                })
            })
            .collect();
        for handle in opened {
            handle
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
}

#[test]
fn a_fresh_database_starts_a_masters_counter_above_what_it_accepted_before() {
    // The Pi lost its database; the master last accepted counter 1000 (or any counter the old
    // database handed out before this moment, which began at an earlier Unix time in ms).
    let mut store = Store::open_in_memory().unwrap();
    let now_ms = 1_800_000_000_000;
    let first = store.next_signing_counter("ESP32_A", now_ms).unwrap();
    assert_eq!(first, now_ms as u64);
    assert!(first > 1_000);
    assert_eq!(
        store.next_signing_counter("ESP32_A", now_ms).unwrap(),
        first + 1,
        "then one by one"
    );
}

/// A database as an agent of schema version `version` left it: the migrations up to it, and
/// rows written with the columns schema 1 already had (every later schema keeps them).
fn database_at_schema(path: &Path, version: usize) {
    let conn = Connection::open(path).unwrap();
    for sql in &schema::MIGRATIONS[..version] {
        conn.execute_batch(sql).unwrap();
    }
    conn.pragma_update(None, "user_version", version as i64)
        .unwrap();
    conn.execute_batch(
        r#"insert into commands (id, master_device_id, slave_mac_address, relay_numbers, actions,
               duration_seconds, command_type, triggered_by, priority, expires_at_ms, state,
               attempts, signing_counter, accepted_at_ms)
           values (7, 'ESP32_A', '14:33:5C:38:BF:60', '[0]', '["on"]', '[60]', 'manual',
               'manual', 10, 1000000, 'sent', 1, 41, 1);
           insert into outbox (class, idempotency_key, payload, created_at_ms)
           values ('completion', 'completion:6', '{"command_id": 6, "status": "completed"}', 2);
           insert into signing_counters (master_device_id, counter) values ('ESP32_A', 41);
           insert into cursors (name, value) values ('rules', '2026-01-01T00:00:00Z');"#,
    )
    .unwrap();
    // The arbiter's state as one snapshot, before schema 8 gave each relay a row.
    if version >= 2 {
        conn.execute_batch(
            r#"insert into safety_state (id, snapshot, updated_at_ms) values (1,
               '{"relays": [{"relay": {"master": "ESP32_A", "slave_mac": "14:33:5c:38:bf:60", "relay": 2},
                             "state": {"state": "on", "since_ms": 5, "deadline_ms": 60000, "holder": null}}],
                 "emergency": {"reason": "test", "by": "operator", "since_ms": 9}}', 9);"#,
        )
        .unwrap();
    }
}

#[test]
fn a_database_of_every_older_schema_is_migrated_keeping_its_rows() {
    let known = schema::MIGRATIONS.len() as i64;
    for version in 1..schema::MIGRATIONS.len() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        database_at_schema(&path, version);

        let mut store = Store::open(&path).unwrap_or_else(|e| panic!("from {version}: {e}"));
        let found: i64 = store
            .conn
            .query_row("pragma user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(found, known, "from schema {version}");
        let sent = store.command(7).unwrap().expect("the command survives");
        assert_eq!(
            (sent.state, sent.attempts),
            (CommandState::Sent, 1),
            "from schema {version}"
        );
        let due = store.outbox_due(10, 10).unwrap();
        assert_eq!(due.len(), 1, "from schema {version}");
        assert_eq!(due[0].idempotency_key, "completion:6");
        assert_eq!(due[0].payload["command_id"], 6);
        assert_eq!(
            store.next_signing_counter("ESP32_A", 3).unwrap(),
            42,
            "from schema {version}: the signing counter never goes back"
        );
        assert_eq!(
            store.cursor("rules").unwrap().as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        if version >= 2 {
            let safety: crate::safety::SafetySnapshot =
                serde_json::from_value(store.safety_snapshot().unwrap().unwrap()).unwrap();
            assert_eq!(safety.relays.len(), 1, "from schema {version}");
            assert_eq!(safety.relays[0].relay.relay, 2);
            assert_eq!(
                safety.emergency.map(|l| l.reason).as_deref(),
                Some("test"),
                "from schema {version}: the latch holds"
            );
            // The migrated relay is the row a later change of it replaces.
            let mut on = relay_entry(2, 50);
            on.relay.slave_mac = "14:33:5C:38:BF:60".into();
            store
                .write_automation(
                    &AutomationWrite {
                        safety: Some(crate::safety::SafetyDelta {
                            changed: vec![on.clone()],
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    60,
                )
                .unwrap();
            let safety: crate::safety::SafetySnapshot =
                serde_json::from_value(store.safety_snapshot().unwrap().unwrap()).unwrap();
            assert_eq!(safety.relays, vec![on], "from schema {version}");
        }
        // What the later migrations added works on the migrated file: a local command's
        // client_id (2), notifications from events (5).
        let mut local = command(-1);
        local.command_type = crate::command::CommandType::Rule;
        store.accept_command(&local, 4).unwrap();
        store
            .enqueue(
                OutboxClass::Event,
                "event:1",
                &json!({"event_type": "x"}),
                5,
            )
            .unwrap();
        assert_eq!(store.notify_inbox(10).unwrap().len(), 1, "from {version}");
        drop(store);
        // And the migrated file opens again as it is.
        let store = Store::open_read_only(&path).unwrap();
        assert_eq!(store.open_commands().unwrap().len(), 2);
    }
}

#[test]
fn a_database_of_a_newer_schema_is_refused_with_its_version_and_rows_untouched() {
    let known = schema::MIGRATIONS.len() as i64;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    database_at_schema(&path, schema::MIGRATIONS.len());
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", known + 1).unwrap();
    }
    for (how, result) in [
        ("open", Store::open(&path).map(drop)),
        ("open_existing", Store::open_existing(&path).map(drop)),
    ] {
        match result {
            Err(e @ StoreError::NewerSchema { found, known: k }) => {
                assert_eq!((found, k), (known + 1, known), "{how}");
                let message = e.to_string();
                assert!(
                    message.contains(&format!("schema version {}", known + 1))
                        && message.contains("a newer autocore-agent")
                        && message.contains("never downgrades"),
                    "{how}: {message}"
                );
            }
            other => panic!("{how}: expected NewerSchema, got {other:?}"),
        }
    }
    assert!(matches!(
        Store::open_read_only(&path).map(drop),
        Err(StoreError::SchemaVersion { .. })
    ));
    let conn = Connection::open(&path).unwrap();
    let found: i64 = conn
        .query_row("pragma user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(found, known + 1, "the version is not touched");
    let rows: i64 = conn
        .query_row("select count(*) from commands", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1, "the rows are not touched");
}

#[test]
fn opening_an_existing_database_again_leaves_its_file_unchanged() {
    // `status` and `rules test` open the agent's file; an upgrade's check compares it byte
    // for byte. A pragma that rewrote the header at every open broke that.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    {
        let mut store = Store::open(&path).unwrap();
        store.accept_command(&command(7), 1).unwrap();
        store.checkpoint().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    for _ in 0..2 {
        let store = Store::open_existing(&path).unwrap();
        store.outbox_stats(10).unwrap();
    }
    assert!(std::fs::read(&path).unwrap() == before, "the file changed");
    let store = Store::open_existing(&path).unwrap();
    let mode: i64 = store
        .conn
        .query_row("pragma auto_vacuum", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        mode, 2,
        "a new file is created with incremental auto-vacuum"
    );
}

/// The push reads the outbox with a new time and limit each time: the statement stays prepared
/// (without the planner's stability guarantee SQLite parsed it again at every new limit).
#[test]
fn reading_the_outbox_with_new_values_does_not_prepare_its_statement_again() {
    let mut store = Store::open_in_memory().unwrap();
    store.enqueue_readings(&[reading("ph", 1)], 1).unwrap();
    for (now, limit) in [(10, 5), (20, 7), (30, 1_000)] {
        assert_eq!(store.outbox_due(now, limit).unwrap().len(), 1);
    }
    let stmt = store.conn.prepare_cached(OUTBOX_DUE).unwrap();
    assert_eq!(
        stmt.get_status(rusqlite::StatementStatus::RePrepare),
        0,
        "the outbox's read was prepared again"
    );
}

/// Two relay reports of one master in one millisecond are two rows: the newer is the truth,
/// and with the time alone as its key the outbox dropped it.
#[test]
fn two_relay_reports_of_one_master_in_one_millisecond_are_both_queued() {
    let mut store = Store::open_in_memory().unwrap();
    let slave = "14:33:5C:38:BF:60".to_string();
    for states in [vec![true, false], vec![false, false]] {
        let report = json!({"master_device_id": "ESP32_A", "slaves": [{"relay_states": states}]});
        store
            .record_relay_report("ESP32_A", &[(slave.clone(), states.clone())], &report, 7)
            .unwrap();
    }
    let rows = store.outbox_due(i64::MAX, 10).unwrap();
    let reports: Vec<&Value> = rows
        .iter()
        .filter(|r| r.class == OutboxClass::RelayState)
        .map(|r| &r.payload["slaves"][0]["relay_states"])
        .collect();
    assert_eq!(reports, vec![&json!([true, false]), &json!([false, false])]);
}
