//! The notifier's switches, rate limit and summary, the signature and the Telegram shape.

use serde_json::json;

use super::*;

fn section(toml_text: &str) -> NotifySection {
    let section: NotifySection = toml::from_str(toml_text).unwrap();
    section.validate().unwrap();
    section
}

const HOOK: &str = r#"
    [[webhooks]]
    name = "ops"
    url = "http://127.0.0.1:9/hook"
    secret = "whsec_0123456789abcdef"
"#;

fn event(seq: i64, event_type: &str, message: &str) -> AgentEvent {
    AgentEvent {
        seq,
        event_type: event_type.to_string(),
        severity: "critical".to_string(),
        message: message.to_string(),
        payload: json!({"reason": "test"}),
        occurred_at_ms: 1_700_000_000_000 + seq,
    }
}

#[test]
fn an_emergency_stop_makes_one_delivery_per_target_with_the_same_id() {
    let s = section(&format!(
        "telegram_bot_token = \"123:abc\"\ntelegram_chat_id = \"42\"\n{HOOK}"
    ));
    let mut n = Notifier::new("pi-1", &s);
    let out = n.on_event(&event(1, "emergency_stop", "stop by test"), 0);
    let targets: Vec<&str> = out.iter().map(|d| d.target.as_str()).collect();
    assert_eq!(targets, ["telegram", "webhook:ops"]);
    assert_eq!(out[0].delivery_id, out[1].delivery_id);
    assert_eq!(out[0].body["kind"], "emergency_stop");
    assert_eq!(out[0].body["details"]["reason"], "test");
    assert!(out[0].text.contains("stop by test"), "{}", out[0].text);
}

#[test]
fn events_that_are_not_notification_kinds_make_nothing() {
    let mut n = Notifier::new("pi-1", &section(HOOK));
    assert!(n.on_event(&event(1, "macro_run", "done"), 0).is_empty());
    assert!(n.on_event(&event(2, "mutex_violation", "x"), 0).is_empty());
}

#[test]
fn a_backend_outage_event_is_the_outage_kind() {
    let mut n = Notifier::new("pi-1", &section(HOOK));
    let out = n.on_event(&event(1, "backend_outage", "away for 42 s"), 0);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].kind, Kind::Outage);
}

#[test]
fn a_kind_switched_off_globally_or_for_a_target_sends_nothing_there() {
    let s = section(&format!(
        "kinds = [\"emergency_stop\", \"outage\"]\ntelegram_bot_token = \"123:abc\"\n\
         telegram_chat_id = \"42\"\ntelegram_kinds = [\"outage\"]\n{HOOK}"
    ));
    let mut n = Notifier::new("pi-1", &s);
    let stop = n.on_event(&event(1, "emergency_stop", "stop"), 0);
    assert_eq!(
        stop.iter().map(|d| d.target.as_str()).collect::<Vec<_>>(),
        ["webhook:ops"]
    );
    assert!(
        n.on_event(&event(2, "master_offline", "gone"), 0)
            .is_empty()
    );
}

#[test]
fn beyond_the_rate_limit_a_kind_is_counted_and_summarised_in_the_next_message() {
    let s = section(&format!("rate_limit_per_kind_per_minute = 2\n{HOOK}"));
    let mut n = Notifier::new("pi-1", &s);
    assert_eq!(n.on_event(&event(1, "master_offline", "a"), 0).len(), 1);
    assert_eq!(n.on_event(&event(2, "master_offline", "b"), 1_000).len(), 1);
    assert!(
        n.on_event(&event(3, "master_offline", "c"), 2_000)
            .is_empty()
    );
    assert!(
        n.on_event(&event(4, "master_offline", "d"), 3_000)
            .is_empty()
    );
    assert_eq!(n.suppressed(Kind::MasterOffline), 2);
    // Another kind has its own budget.
    assert_eq!(n.on_event(&event(5, "master_online", "e"), 3_000).len(), 1);
    // A minute after the first, one more goes, with the count of those held back.
    let next = n.on_event(&event(6, "master_offline", "f"), RATE_WINDOW_MS);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].body["suppressed_before"], 2);
    assert!(next[0].text.contains("+2 more"), "{}", next[0].text);
    assert_eq!(n.suppressed(Kind::MasterOffline), 0);
}

#[test]
fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
    // Computed independently: python3 -c "import hmac,hashlib; print(hmac.new(
    //   b'whsec_0123456789abcdef', b'1700000000.{\"hello\":\"world\"}', hashlib.sha256).hexdigest())"
    assert_eq!(
        signature(
            b"whsec_0123456789abcdef",
            1_700_000_000,
            br#"{"hello":"world"}"#
        ),
        "sha256=27081fd1d84a8689b430c048f40cfc8f1b82009320edcd4d277d5ebf838bff42"
    );
}

#[test]
fn a_telegram_message_posts_chat_id_and_text_to_send_message() {
    let (url, body) = telegram_request("http://127.0.0.1:5/", "123:abc", "-100", "hi");
    assert_eq!(url, "http://127.0.0.1:5/bot123:abc/sendMessage");
    assert_eq!(body, json!({"chat_id": "-100", "text": "hi"}));
}

#[test]
fn success_is_delivered_throttling_and_server_errors_retry_other_refusals_give_up() {
    assert_eq!(verdict(Some(200)), Verdict::Delivered);
    assert_eq!(verdict(Some(204)), Verdict::Delivered);
    assert_eq!(verdict(None), Verdict::Retry);
    assert_eq!(verdict(Some(429)), Verdict::Retry);
    assert_eq!(verdict(Some(503)), Verdict::Retry);
    assert_eq!(verdict(Some(400)), Verdict::GiveUp);
    assert_eq!(verdict(Some(401)), Verdict::GiveUp);
    assert_eq!(verdict(Some(404)), Verdict::GiveUp);
}

#[test]
fn bad_notify_settings_name_their_key() {
    let key = |text: &str| match toml::from_str::<NotifySection>(text).unwrap().validate() {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(
        key("rate_limit_per_kind_per_minute = 0"),
        "notify.rate_limit_per_kind_per_minute"
    );
    assert_eq!(
        key("telegram_bot_token = \"1:a\""),
        "notify.telegram_chat_id"
    );
    assert_eq!(
        key("[[webhooks]]\nname = \"a\"\nurl = \"ftp://x\"\nsecret = \"0123456789abcdef\""),
        "notify.webhooks[0].url"
    );
    assert_eq!(
        key("[[webhooks]]\nname = \"a\"\nurl = \"http://x\"\nsecret = \"short\""),
        "notify.webhooks[0].secret"
    );
}

#[test]
fn secrets_never_show_in_debug_output() {
    let s = section(&format!(
        "telegram_bot_token = \"123:tokentoken\"\ntelegram_chat_id = \"42\"\n{HOOK}"
    ));
    let debug = format!("{s:?}");
    assert!(!debug.contains("tokentoken"));
    assert!(!debug.contains("whsec_0123456789abcdef"));
}
