//! The polling API's promises, through `tower::ServiceExt::oneshot` on `polling_app`: the
//! backend's row shape, order, limits and errors; tokens per master; a master sees only its own
//! commands and rules; completions end a command once and queue its report for the cloud.

use std::sync::atomic::{AtomicI64, Ordering};

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

use super::*;
use crate::config::Secret;
use crate::store::{CommandRecord, OutboxClass, Store};

const POLLER: &str = "ESP32_POLL";
const POLLER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const NEIGHBOUR: &str = "ESP32_NEIGHBOUR";
const NEIGHBOUR_KEY: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const PUSHED: &str = "ESP32_MQTT";
const PUSHED_KEY: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";

/// A fixed "now", far from 1970, so that expiry and lock times are easy to read.
const T0: i64 = 1_800_000_000_000;

fn master(device_id: &str, key: &str, transport: Transport) -> MasterSection {
    MasterSection {
        device_id: device_id.into(),
        key: Secret::new(key),
        transport,
    }
}

fn token(device_id: &str, key: &str) -> String {
    master_token(&hex::decode(key).unwrap(), device_id)
}

fn command(id: i64, master: &str) -> CommandRecord {
    CommandRecord {
        id,
        master_device_id: master.into(),
        slave_mac_address: "14:33:5C:38:BF:60".into(),
        slave_device_id: Some("ESP32_SLAVE_1".into()),
        actions: crate::command::actions_from_columns(
            &[0, 2],
            &["on".into(), "off".into()],
            &[30, 0],
        )
        .unwrap(),
        command_type: crate::command::CommandType::Manual,
        triggered_by: crate::command::CommandSource::Manual,
        priority: 10,
        rule_id: None,
        rule_name: None,
        expires_at_ms: T0 + 300_000,
        state: CommandState::Accepted,
        attempts: 0,
        last_sent_at_ms: None,
        polled_by: None,
    }
}

/// A store with the given commands accepted at T0 (in this order), and the API over it, on a
/// clock that reads `clock` (each test passes its own static).
async fn api_with(
    commands: Vec<CommandRecord>,
    clock: &'static AtomicI64,
    time: fn() -> i64,
) -> (LocalApi, StoreHandle) {
    clock.store(T0, Ordering::SeqCst);
    let mut store = Store::open_in_memory().unwrap();
    for (i, c) in commands.iter().enumerate() {
        store.accept_command(c, T0 - 1_000 + i as i64).unwrap();
    }
    let store = StoreHandle::new(store);
    let masters = [
        master(POLLER, POLLER_KEY, Transport::Poll),
        master(NEIGHBOUR, NEIGHBOUR_KEY, Transport::Poll),
        master(PUSHED, PUSHED_KEY, Transport::Mqtt),
    ];
    let api = LocalApi::new(store.clone(), &masters, Arc::new(Metrics::new())).with_clock(time);
    (api, store)
}

/// Sends one request; returns the status, the body as JSON (Null if empty) and the headers.
async fn send(
    api: &LocalApi,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
    prefer: Option<&str>,
) -> (StatusCode, Value, HeaderMap) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(prefer) = prefer {
        request = request.header("Prefer", prefer);
    }
    let response = polling_app(api.clone())
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, value, headers)
}

async fn rpc(
    api: &LocalApi,
    function: &str,
    token: Option<&str>,
    args: Value,
) -> (StatusCode, Value) {
    let (status, body, _) = send(
        api,
        "POST",
        &format!("/rest/v1/rpc/{function}"),
        token,
        &args.to_string(),
        None,
    )
    .await;
    (status, body)
}

fn ids(rows: &Value) -> Vec<i64> {
    rows.as_array()
        .unwrap_or_else(|| panic!("not an array: {rows}"))
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn the_token_is_the_hex_hmac_of_the_context_and_the_device_id() {
    // Computed independently: python3 -c "import hmac, hashlib; print(hmac.new(bytes.fromhex(
    // '0011...eeff' * 2), b'autocore/local-api/v1:ESP32_HIDRO_F44738', hashlib.sha256).hexdigest())"
    assert_eq!(
        token("ESP32_HIDRO_F44738", POLLER_KEY),
        "347326aa74e6cfb3fa1cfadee0a09c84d93b2c31df0e22f2903604b868089e37"
    );
}

#[tokio::test]
async fn a_polling_master_gets_its_commands_as_backend_rows_locked_in_the_clouds_order() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let mut rule = command(2, POLLER);
    rule.command_type = crate::command::CommandType::Rule;
    rule.triggered_by = crate::command::CommandSource::Rule;
    rule.rule_id = Some("RULE_001".into());
    rule.rule_name = Some("pH low".into());
    let mut peristaltic = command(3, POLLER);
    peristaltic.command_type = crate::command::CommandType::Peristaltic;
    let mut urgent = command(4, POLLER);
    urgent.priority = 90;
    let (api, _) = api_with(
        vec![
            command(1, POLLER),
            rule,
            peristaltic,
            urgent,
            command(5, POLLER),
        ],
        &NOW,
        || NOW.load(Ordering::SeqCst),
    )
    .await;
    let me = token(POLLER, POLLER_KEY);
    let (status, rows) = rpc(
        &api,
        "get_and_lock_slave_commands",
        Some(&me),
        json!({"p_master_device_id": POLLER, "p_limit": 4, "p_timeout_seconds": 30}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    assert_eq!(ids(&rows), vec![3, 2, 4, 1]);
    let row = &rows[1];
    assert_eq!(row["master_device_id"], POLLER);
    assert_eq!(row["slave_mac_address"], "14:33:5C:38:BF:60");
    assert_eq!(row["slave_device_id"], "ESP32_SLAVE_1");
    assert_eq!(row["relay_numbers"], json!([0, 2]));
    assert_eq!(row["actions"], json!(["on", "off"]));
    assert_eq!(row["duration_seconds"], json!([30, 0]));
    assert_eq!(row["command_type"], "rule");
    assert_eq!(row["triggered_by"], "rule");
    assert_eq!(row["priority"], 10);
    assert_eq!(row["rule_id"], "RULE_001");
    assert_eq!(row["rule_name"], "pH low");
    assert_eq!(row["status"], "processing");
    assert_eq!(row["delivery_count"], 1);
    assert_eq!(row["locked_by"], POLLER);
    let expires = row["expires_at"].as_str().unwrap();
    assert_eq!(
        crate::cloud::parse_timestamp_ms(expires),
        Some(T0 + 300_000),
        "RFC 3339 text: {expires}"
    );
    assert!(expires.ends_with('Z'), "{expires}");

    // The defaults (p_limit 5) give the one left; then nothing until the locks time out.
    let (_, rest) = rpc(
        &api,
        "get_and_lock_slave_commands",
        Some(&me),
        json!({"p_master_device_id": POLLER}),
    )
    .await;
    assert_eq!(ids(&rest), vec![5]);
    let args = json!({"p_master_device_id": POLLER, "p_timeout_seconds": 30});
    let (_, none) = rpc(&api, "get_and_lock_slave_commands", Some(&me), args.clone()).await;
    assert_eq!(none, json!([]));
    NOW.store(T0 + 30_001, Ordering::SeqCst);
    let (_, again) = rpc(&api, "get_and_lock_slave_commands", Some(&me), args).await;
    assert_eq!(
        ids(&again),
        vec![3, 2, 4, 1, 5],
        "handed out again after the timeout"
    );
    assert_eq!(again[0]["delivery_count"], 2);
}

#[tokio::test]
async fn an_expired_command_is_never_handed_out_and_the_cloud_learns_it_expired() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let mut stale = command(1, POLLER);
    stale.expires_at_ms = T0 - 1;
    let (api, store) = api_with(vec![stale, command(2, POLLER)], &NOW, || {
        NOW.load(Ordering::SeqCst)
    })
    .await;
    let (_, rows) = rpc(
        &api,
        "get_and_lock_slave_commands",
        Some(&token(POLLER, POLLER_KEY)),
        json!({"p_master_device_id": POLLER}),
    )
    .await;
    assert_eq!(ids(&rows), vec![2]);
    let due = store.call(|s| s.outbox_due(i64::MAX, 10)).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].class, OutboxClass::Completion);
    assert_eq!(due[0].payload["command_id"], 1);
    assert_eq!(due[0].payload["status"], "expired");
    assert!(
        api.metrics
            .render()
            .contains("autocore_agent_commands_finished_total{outcome=\"expired\"} 1")
    );
}

#[tokio::test]
async fn a_missing_or_wrong_token_gets_401_with_a_postgrest_error() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let (api, _) = api_with(vec![command(1, POLLER)], &NOW, || {
        NOW.load(Ordering::SeqCst)
    })
    .await;
    let args = json!({"p_master_device_id": POLLER});
    let forged = token(POLLER, NEIGHBOUR_KEY);
    let unknown = token("ESP32_STRANGER", POLLER_KEY);
    for bad in [
        None,
        Some("not-hex"),
        Some(""),
        Some(forged.as_str()),
        Some(unknown.as_str()),
    ] {
        let (status, body, headers) = send(
            &api,
            "POST",
            "/rest/v1/rpc/get_and_lock_slave_commands",
            bad,
            &args.to_string(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "token {bad:?}");
        assert_eq!(body["code"], "PGRST301");
        assert!(body["message"].is_string() && body.get("details").is_some());
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    }
    let (status, _) = rpc(
        &api,
        "complete_slave_command",
        Some(&forged),
        json!({"p_command_id": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn another_masters_token_gets_nothing_of_this_master_and_changes_nothing() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let (api, store) = api_with(vec![command(1, POLLER), command(2, POLLER)], &NOW, || {
        NOW.load(Ordering::SeqCst)
    })
    .await;
    store
        .call(|s| {
            s.apply_rule_changes(&[rule("r1", POLLER, 50)])?;
            Ok(())
        })
        .await
        .unwrap();
    let neighbour = token(NEIGHBOUR, NEIGHBOUR_KEY);
    let (status, rows) = rpc(
        &api,
        "get_and_lock_slave_commands",
        Some(&neighbour),
        json!({"p_master_device_id": POLLER}),
    )
    .await;
    assert_eq!((status, rows), (StatusCode::OK, json!([])));
    let (_, rows) = rpc(
        &api,
        "complete_slave_command",
        Some(&neighbour),
        json!({"p_command_id": 1, "p_execution_time_ms": 5}),
    )
    .await;
    assert_eq!(rows, json!([]));
    let (_, rows) = rpc(
        &api,
        "fail_slave_command",
        Some(&neighbour),
        json!({"p_command_id": 1, "p_error_message": "no"}),
    )
    .await;
    assert_eq!(rows, json!([]));
    let (status, rows, _) = send(
        &api,
        "PATCH",
        "/rest/v1/relay_commands_slave?id=eq.2",
        Some(&neighbour),
        r#"{"status":"completed","execution_time_ms":5}"#,
        Some("return=representation"),
    )
    .await;
    assert_eq!((status, rows), (StatusCode::OK, json!([])));
    let (_, rules) = rpc(
        &api,
        "get_active_decision_rules",
        Some(&neighbour),
        json!({"p_device_id": POLLER}),
    )
    .await;
    assert_eq!(rules, json!([]));

    let open = store.call(|s| s.open_commands()).await.unwrap();
    assert_eq!(open.len(), 2, "both still open");
    assert!(
        open.iter().all(|c| c.state == CommandState::Accepted),
        "and never handed out"
    );
    assert!(
        store
            .call(|s| s.outbox_due(i64::MAX, 10))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_master_whose_commands_go_over_mqtt_polls_an_empty_list() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let (api, store) = api_with(vec![command(1, PUSHED)], &NOW, || {
        NOW.load(Ordering::SeqCst)
    })
    .await;
    let pushed = token(PUSHED, PUSHED_KEY);
    let (status, rows) = rpc(
        &api,
        "get_and_lock_slave_commands",
        Some(&pushed),
        json!({"p_master_device_id": PUSHED}),
    )
    .await;
    assert_eq!((status, rows), (StatusCode::OK, json!([])));
    let (_, rows) = rpc(
        &api,
        "complete_slave_command",
        Some(&pushed),
        json!({"p_command_id": 1}),
    )
    .await;
    assert_eq!(rows, json!([]), "the delivery task ends MQTT commands");
    let c = store.call(|s| s.command(1)).await.unwrap().unwrap();
    assert_eq!(c.state, CommandState::Accepted);
}

#[tokio::test]
async fn bad_parameters_get_400_as_the_backend_refuses_them() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let (api, _) = api_with(vec![command(1, POLLER)], &NOW, || {
        NOW.load(Ordering::SeqCst)
    })
    .await;
    let me = token(POLLER, POLLER_KEY);
    let cases = [
        (
            "get_and_lock_slave_commands",
            json!({"p_master_device_id": POLLER, "p_limit": 0}),
            "22023",
        ),
        (
            "get_and_lock_slave_commands",
            json!({"p_master_device_id": POLLER, "p_limit": 101}),
            "22023",
        ),
        (
            "get_and_lock_slave_commands",
            json!({"p_master_device_id": POLLER, "p_limit": null}),
            "22023",
        ),
        (
            "get_and_lock_slave_commands",
            json!({"p_master_device_id": POLLER, "p_timeout_seconds": 0}),
            "22023",
        ),
        (
            "get_and_lock_slave_commands",
            json!({"p_master_device_id": POLLER, "p_timeout_seconds": 3601}),
            "22023",
        ),
        (
            "get_and_lock_slave_commands",
            json!({"p_limit": 5}),
            "22023",
        ),
        (
            "get_and_lock_slave_commands",
            json!({"p_master_device_id": POLLER, "p_limits": 5}),
            "22023",
        ),
        (
            "get_and_lock_slave_commands",
            json!({"p_master_device_id": 7}),
            "22023",
        ),
        (
            "complete_slave_command",
            json!({"p_command_id": "one"}),
            "22023",
        ),
        (
            "complete_slave_command",
            json!({"p_command_id": 1, "p_execution_time_ms": -1}),
            "22023",
        ),
        ("fail_slave_command", json!({"p_command_id": 1}), "22023"),
        (
            "fail_slave_command",
            json!({"p_command_id": 1, "p_error_message": ""}),
            "22023",
        ),
        (
            "get_active_decision_rules",
            json!({"p_device_id": POLLER, "p_limit": 1001}),
            "22023",
        ),
    ];
    for (function, args, code) in cases {
        let (status, body) = rpc(&api, function, Some(&me), args.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{function} {args}: {body}");
        assert_eq!(body["code"], code, "{function} {args}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, body, _) = send(
        &api,
        "POST",
        "/rest/v1/rpc/get_and_lock_slave_commands",
        Some(&me),
        "{not json",
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("PGRST102"))
    );
    let (_, body) = rpc(
        &api,
        "get_and_lock_slave_commands",
        Some(&me),
        json!({"p_master_device_id": POLLER, "p_limit": 0}),
    )
    .await;
    assert_eq!(body["message"], "p_limit must be between 1 and 100, got 0");
}

#[tokio::test]
async fn a_second_completion_changes_nothing_and_one_report_goes_to_the_cloud() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let (api, store) = api_with(vec![command(1, POLLER)], &NOW, || {
        NOW.load(Ordering::SeqCst)
    })
    .await;
    let me = token(POLLER, POLLER_KEY);
    rpc(
        &api,
        "get_and_lock_slave_commands",
        Some(&me),
        json!({"p_master_device_id": POLLER}),
    )
    .await;
    NOW.store(T0 + 200, Ordering::SeqCst);
    let (status, rows) = rpc(
        &api,
        "complete_slave_command",
        Some(&me),
        json!({"p_command_id": 1, "p_execution_time_ms": 150, "p_relay_states": [true, false, false]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    assert_eq!(ids(&rows), vec![1]);
    assert_eq!(rows[0]["status"], "completed");
    assert_eq!(rows[0]["execution_time_ms"], 150);
    assert_eq!(
        crate::cloud::parse_timestamp_ms(rows[0]["completed_at"].as_str().unwrap()),
        Some(T0 + 200)
    );
    let (_, again) = rpc(
        &api,
        "fail_slave_command",
        Some(&me),
        json!({"p_command_id": 1, "p_error_message": "relay stuck"}),
    )
    .await;
    assert_eq!(again[0]["status"], "completed", "the first end stands");
    assert_eq!(again[0]["error_message"], Value::Null);
    let (_, unknown) = rpc(
        &api,
        "complete_slave_command",
        Some(&me),
        json!({"p_command_id": 999}),
    )
    .await;
    assert_eq!(unknown, json!([]));

    let due = store.call(|s| s.outbox_due(i64::MAX, 10)).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].payload["status"], "completed");
    assert_eq!(due[0].payload["execution_time_ms"], 150);
    assert_eq!(due[0].payload["relay_states"], json!([true, false, false]));
    assert!(
        api.metrics
            .render()
            .contains("autocore_agent_commands_finished_total{outcome=\"completed\"} 1")
    );
}

#[tokio::test]
async fn a_failure_is_reported_with_its_reason() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let (api, store) = api_with(vec![command(1, POLLER)], &NOW, || {
        NOW.load(Ordering::SeqCst)
    })
    .await;
    let me = token(POLLER, POLLER_KEY);
    let long = "x".repeat(ERROR_MESSAGE_CHARS_MAX + 50);
    let (_, rows) = rpc(
        &api,
        "fail_slave_command",
        Some(&me),
        json!({"p_command_id": 1, "p_error_message": long}),
    )
    .await;
    assert_eq!(rows[0]["status"], "failed");
    assert_eq!(
        rows[0]["error_message"].as_str().unwrap().len(),
        ERROR_MESSAGE_CHARS_MAX
    );
    let due = store.call(|s| s.outbox_due(i64::MAX, 10)).await.unwrap();
    assert_eq!(due[0].payload["status"], "failed");
}

#[tokio::test]
async fn a_patch_like_mark_command_completed_ends_the_command_and_answers_like_postgrest() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let (api, store) = api_with(vec![command(1, POLLER), command(2, POLLER)], &NOW, || {
        NOW.load(Ordering::SeqCst)
    })
    .await;
    let me = token(POLLER, POLLER_KEY);
    let (status, rows, _) = send(
        &api,
        "PATCH",
        "/rest/v1/relay_commands_slave?id=eq.1",
        Some(&me),
        r#"{"status":"completed","completed_at":"2024-01-15T10:30:00Z","execution_time_ms":150}"#,
        Some("return=representation"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    assert_eq!(ids(&rows), vec![1]);
    assert_eq!(rows[0]["status"], "completed");
    assert_eq!(rows[0]["execution_time_ms"], 150);

    let (status, body, _) = send(
        &api,
        "PATCH",
        "/rest/v1/relay_commands_slave?id=eq.2",
        Some(&me),
        r#"{"status":"failed","error_message":"slave silent"}"#,
        None,
    )
    .await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let failed = store.call(|s| s.command(2)).await.unwrap().unwrap();
    assert_eq!(failed.state, CommandState::Failed);

    for (query, body) in [
        ("", r#"{"status":"completed"}"#),
        ("?id=gt.1", r#"{"status":"completed"}"#),
        (
            "?master_device_id=eq.ESP32_POLL",
            r#"{"status":"completed"}"#,
        ),
        ("?id=eq.1", r#"{"status":"pending"}"#),
        ("?id=eq.1", r#"{"status":"completed","priority":99}"#),
    ] {
        let (status, body, _) = send(
            &api,
            "PATCH",
            &format!("/rest/v1/relay_commands_slave{query}"),
            Some(&me),
            body,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body["code"].is_string());
    }
    assert_eq!(
        store
            .call(|s| s.outbox_due(i64::MAX, 10))
            .await
            .unwrap()
            .len(),
        2
    );
}

fn rule(id: &str, device: &str, priority: i32) -> RuleRecord {
    RuleRecord {
        id: id.into(),
        device_id: device.into(),
        rule_id: format!("RULE_{id}"),
        rule_name: Some(format!("rule {id}")),
        rule_description: None,
        rule_json: Some(json!({"conditions": [], "actions": [{"relay": 0}]})),
        enabled: true,
        priority,
        cooldown_seconds: 60,
        max_executions_per_hour: 10,
        revision: 1,
        deleted: false,
        changed_at: "2026-11-22T00:00:00Z".into(),
    }
}

#[tokio::test]
async fn active_rules_come_from_the_mirror_by_priority_without_disabled_or_deleted_ones() {
    static NOW: AtomicI64 = AtomicI64::new(0);
    let (api, store) = api_with(vec![], &NOW, || NOW.load(Ordering::SeqCst)).await;
    store
        .call(|s| {
            let mut disabled = rule("r4", POLLER, 99);
            disabled.enabled = false;
            let mut deleted = rule("r5", POLLER, 98);
            deleted.deleted = true;
            s.apply_rule_changes(&[
                rule("r1", POLLER, 10),
                rule("r2", POLLER, 80),
                rule("r3", POLLER, 50),
                disabled,
                deleted,
                rule("r6", NEIGHBOUR, 100),
            ])?;
            Ok(())
        })
        .await
        .unwrap();
    let me = token(POLLER, POLLER_KEY);
    let (status, rules) = rpc(
        &api,
        "get_active_decision_rules",
        Some(&me),
        json!({"p_device_id": POLLER, "p_limit": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rules}");
    let rule_ids: Vec<&str> = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    assert_eq!(rule_ids, vec!["RULE_r2", "RULE_r3"]);
    assert_eq!(rules[0]["rule_json"]["actions"][0]["relay"], 0);
    assert_eq!(rules[0]["enabled"], true);
    let (_, all) = rpc(
        &api,
        "get_active_decision_rules",
        Some(&me),
        json!({"p_device_id": POLLER}),
    )
    .await;
    assert_eq!(all.as_array().unwrap().len(), 3);
}
