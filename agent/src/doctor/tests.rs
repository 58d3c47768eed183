//! Doctor's classifications, fact by fact, and its two I/O edges that need no network: the
//! fsync probe and the read-only database.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn the_fsync_median_sets_the_level_with_a_warning_above_15_ms() {
    let dir = Path::new("/var/lib/autocore");
    let fast = [ms(3), ms(2), ms(40), ms(4), ms(3)];
    assert_eq!(classify_fsync(dir, Ok(&fast)).level, Level::Ok);
    let slow = [ms(18), ms(22), ms(2), ms(30), ms(20)];
    let finding = classify_fsync(dir, Ok(&slow));
    assert_eq!(finding.level, Level::Warn);
    assert!(finding.message.starts_with("20.0 ms median"), "{finding}");
    assert!(finding.hint.as_deref().unwrap().contains("SD card"));
    let dying = [ms(400); 5];
    assert_eq!(classify_fsync(dir, Ok(&dying)).level, Level::Fail);
}

#[test]
fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
    assert_eq!(median(&[ms(1), ms(9), ms(3), ms(5)]), Some(ms(4)));
    assert_eq!(median(&[]), None);
}

#[test]
fn an_fsync_that_cannot_be_measured_is_a_warning_naming_the_agents_user() {
    let finding = classify_fsync(Path::new("/var/lib/autocore"), Err("Permission denied"));
    assert_eq!(finding.level, Level::Warn);
    assert!(finding.hint.unwrap().contains("agent's user"));
}

#[test]
fn a_token_expiring_within_a_day_warns_and_an_expired_one_fails() {
    let now = 1_800_000_000;
    assert_eq!(
        classify_token(Ok(Some(now + 30 * 86_400)), now).level,
        Level::Ok
    );
    let soon = classify_token(Ok(Some(now + 5 * 3600)), now);
    assert_eq!(soon.level, Level::Warn);
    assert!(soon.message.starts_with("expires in 5 h"), "{soon}");
    let gone = classify_token(Ok(Some(now - 7200)), now);
    assert_eq!(gone.level, Level::Fail);
    assert!(gone.message.starts_with("expired 2 h ago"), "{gone}");
    assert!(gone.hint.unwrap().contains("cloud.jwt_file"));
    assert_eq!(classify_token(Ok(None), now).level, Level::Ok);
    assert_eq!(
        classify_token(Err("not a JWT".into()), now).level,
        Level::Fail
    );
}

#[test]
fn a_refreshed_session_token_with_an_hour_left_is_fine_and_an_ended_one_a_warning() {
    let now = 1_800_000_000;
    let fine = classify_session(Ok(Some(now + 3000)), now);
    assert_eq!(fine.level, Level::Ok, "{fine}");
    assert!(fine.message.contains("refreshes"), "{fine}");
    let ended = classify_session(Ok(Some(now - 60)), now);
    assert_eq!(ended.level, Level::Warn);
    assert!(ended.hint.unwrap().contains("provision"));
    assert_eq!(
        classify_session(Err("not a JWT".into()), now).level,
        Level::Fail
    );
}

#[test]
fn the_exp_claim_is_read_from_the_tokens_payload_without_verifying_it() {
    use base64::Engine as _;
    let encode = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let token = format!(
        "{}.{}.signature",
        encode(r#"{"alg":"HS256"}"#),
        encode(r#"{"sub":"x","exp":1800000000}"#)
    );
    assert_eq!(jwt_exp(&token), Ok(Some(1_800_000_000)));
    let no_exp = format!("h.{}.s", encode(r#"{"sub":"x"}"#));
    assert_eq!(jwt_exp(&no_exp), Ok(None));
    assert!(jwt_exp("opaque-token").is_err());
}

#[test]
fn each_connack_refusal_is_a_failure_in_words_with_the_login_hint_for_credentials() {
    let url = "mqtt://broker:1883";
    for (code, words) in [
        (
            ConnectReturnCode::BadUserNamePassword,
            "username or password",
        ),
        (ConnectReturnCode::NotAuthorized, "not authorised"),
    ] {
        let finding = classify_broker(url, Some("pi-1"), &BrokerOutcome::Refused(code));
        assert_eq!(finding.level, Level::Fail);
        assert!(finding.message.contains(words), "{finding}");
        assert!(
            finding
                .hint
                .unwrap()
                .contains("[mqtt] username and password")
        );
    }
    let busy = classify_broker(
        url,
        None,
        &BrokerOutcome::Refused(ConnectReturnCode::ServiceUnavailable),
    );
    assert!(busy.message.contains("unavailable (CONNACK 3)"), "{busy}");
    assert_eq!(
        classify_broker(url, Some("pi-1"), &BrokerOutcome::Accepted).level,
        Level::Ok
    );
}

#[test]
fn a_broker_that_does_not_answer_fails_as_unreachable_with_how_to_start_it() {
    let io =
        rumqttc::ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
    let finding = classify_broker("mqtt://b", None, &BrokerOutcome::from_error(&io));
    assert_eq!(finding.level, Level::Fail);
    assert!(finding.message.starts_with("unreachable"), "{finding}");
    assert!(finding.hint.unwrap().contains("mosquitto"));
}

#[test]
fn a_running_agents_refused_login_is_reported_from_its_health() {
    let finding = classify_broker_health("mqtt://b", "not_authorized", Some("CONNACK 5"));
    assert_eq!(finding.level, Level::Fail);
    assert!(finding.message.contains("running agent"), "{finding}");
    assert_eq!(
        classify_broker_health("mqtt://b", "connected", None).level,
        Level::Ok
    );
}

#[test]
fn a_backend_answer_is_ok_refused_or_down_by_its_status() {
    let url = "http://rest";
    let ok = classify_backend(url, &BackendAnswer::Status(200, "[]".into()), ms(12));
    assert_eq!(ok.level, Level::Ok);
    let refused = classify_backend(
        url,
        &BackendAnswer::Status(
            401,
            r#"{"code":"PGRST301","message":"JWSError JWSInvalidSignature"}"#.into(),
        ),
        ms(3),
    );
    assert_eq!(refused.level, Level::Fail);
    assert_eq!(
        refused.message,
        "token refused (HTTP 401: JWSError JWSInvalidSignature)"
    );
    assert!(refused.hint.is_some());
    let down = classify_backend(url, &BackendAnswer::Status(503, String::new()), ms(3));
    assert!(down.message.contains("server error"), "{down}");
    let away = classify_backend(url, &BackendAnswer::Unreachable("refused".into()), ms(0));
    assert!(away.message.starts_with("unreachable"), "{away}");
    let wrong_path = classify_backend(url, &BackendAnswer::Status(404, String::new()), ms(1));
    assert!(wrong_path.hint.unwrap().contains("cloud.rest_url"));
}

#[test]
fn the_clock_skew_is_measured_against_the_middle_of_the_dates_second() {
    // The backend said 12:00:00 (meaning 12:00:00.000 to .999); we were at 12:00:03.500.
    let at = jiff::Timestamp::from_second(1_800_000_000)
        .unwrap()
        .as_millisecond();
    let date = "Fri, 15 Jan 2027 08:00:00 GMT";
    assert_eq!(
        jiff::fmt::rfc2822::DateTimeParser::new()
            .parse_timestamp(date)
            .unwrap()
            .as_second(),
        1_800_000_000
    );
    assert_eq!(skew_ms(date, at + 3_400, at + 3_600), Ok(3_000));
    assert_eq!(skew_ms(date, at - 10_000, at - 9_000), Ok(-10_000));
    assert!(skew_ms("yesterday", at, at).is_err());
}

#[test]
fn a_skew_of_a_second_is_noise_ten_seconds_warn_and_more_fails() {
    assert_eq!(classify_skew(Ok(1_500)).level, Level::Ok);
    let warn = classify_skew(Ok(-6_000));
    assert_eq!(warn.level, Level::Warn);
    assert!(warn.message.starts_with("6.0 s behind"), "{warn}");
    assert_eq!(classify_skew(Ok(45_000)).level, Level::Fail);
    assert_eq!(classify_skew(Err("no answer")).level, Level::Warn);
}

#[test]
fn ntp_synchronised_is_ok_and_anything_else_warns() {
    assert_eq!(classify_ntp(Ok("yes\n")).level, Level::Ok);
    assert_eq!(classify_ntp(Ok("no\n")).level, Level::Warn);
    let unknown = classify_ntp(Err("timedatectl: not booted with systemd"));
    assert_eq!(unknown.level, Level::Warn);
    assert!(unknown.message.starts_with("cannot tell"), "{unknown}");
}

#[test]
fn free_space_under_100_mb_fails_and_under_a_gigabyte_or_ten_percent_warns() {
    let dir = Path::new("/var/lib/autocore");
    const GIB: u64 = 1024 * 1024 * 1024;
    assert_eq!(classify_free(dir, 20 * GIB, 32 * GIB).level, Level::Ok);
    assert_eq!(classify_free(dir, 2 * GIB, 64 * GIB).level, Level::Warn);
    assert_eq!(classify_free(dir, GIB / 2, 2 * GIB).level, Level::Warn);
    assert_eq!(classify_free(dir, 50 << 20, 32 * GIB).level, Level::Fail);
}

#[test]
fn loose_modes_warn_with_the_chmod_that_fixes_them() {
    let dir = Path::new("/var/lib/autocore");
    let db = PathBuf::from("/var/lib/autocore/agent.db");
    let tight = classify_permissions(Some((dir, 0o40700)), &[(db.clone(), 0o100600)], None);
    assert_eq!(tight.level, Level::Ok, "{tight}");
    let loose = classify_permissions(Some((dir, 0o40755)), &[(db, 0o100644)], None);
    assert_eq!(loose.level, Level::Warn);
    let hint = loose.hint.unwrap();
    assert!(
        hint.contains("chmod 700 /var/lib/autocore") && hint.contains("chmod 600 /var/lib"),
        "{hint}"
    );
}

#[test]
fn a_master_never_seen_or_silent_warns_and_one_heard_lately_is_ok() {
    let now = 10_000_000;
    let never = classify_master("M1", &MasterFacts::default(), now, 30_000);
    assert_eq!(never.level, Level::Warn);
    assert!(never.message.starts_with("never seen"), "{never}");
    let fresh = MasterFacts {
        presence: Some((true, Some(now - 4_000))),
        signing_counter: Some(17),
        report_counter: Some(12),
    };
    let ok = classify_master("M1", &fresh, now, 30_000);
    assert_eq!(ok.level, Level::Ok);
    assert_eq!(ok.check, "master M1");
    assert_eq!(
        ok.message,
        "online, last seen 4.0 s ago; signing counter 17, report counter 12"
    );
    let stale = MasterFacts {
        presence: Some((true, Some(now - 3 * 3_600_000))),
        ..fresh.clone()
    };
    assert_eq!(
        classify_master("M1", &stale, now, 30_000).level,
        Level::Warn
    );
    let offline = MasterFacts {
        presence: Some((false, Some(now - 60_000))),
        ..fresh
    };
    let finding = classify_master("M1", &offline, now, 30_000);
    assert!(
        finding.message.starts_with("offline, last seen 60 s ago"),
        "{finding}"
    );
}

#[test]
fn a_line_reads_level_check_finding_and_what_to_do() {
    let line = Finding::fail("broker", "unreachable", "start it").to_string();
    assert_eq!(line, "FAIL  broker: unreachable — start it");
    assert_eq!(Finding::ok("disk", "fine").to_string(), "ok    disk: fine");
    let report = Report {
        findings: vec![Finding::ok("a", "x"), Finding::warn("b", "y", "z")],
    };
    assert!(report.result().is_ok(), "warnings alone pass");
    assert_eq!(report.summary(), "2 checks: 1 ok, 1 warning(s), 0 failed");
    assert_eq!(report.json()["findings"][1]["level"], "warn");
}

#[test]
fn the_fsync_probe_measures_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let samples = measure_fsync(dir.path()).unwrap();
    assert_eq!(samples.len(), FSYNC_SAMPLES);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn the_database_is_opened_read_only_and_a_missing_one_is_never_created() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("agent.db");
    assert!(matches!(
        Store::open_read_only(&db),
        Err(StoreError::Missing(_))
    ));
    assert!(!db.parent().unwrap().exists());
    {
        let mut store = Store::open(&db).unwrap();
        store.record_presence("M1", true, None, None, 5).unwrap();
        store.next_signing_counter("M1", 1).unwrap();
    }
    // Closed cleanly: no -wal or -shm left, and read-only must still read it.
    let store = Store::open_read_only(&db).unwrap();
    assert_eq!(store.devices().unwrap(), vec![("M1".into(), true, Some(5))]);
    assert_eq!(store.signing_counters().unwrap(), vec![("M1".into(), 1)]);
}
