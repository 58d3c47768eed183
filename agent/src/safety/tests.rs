use super::*;

const M: &str = "master-1";
const MAC: &str = "AA:BB:CC:DD:EE:01";

fn interlocks() -> Interlocks {
    Interlocks {
        mutex_groups: vec![MutexGroup {
            name: "motor".into(),
            master: M.into(),
            slave_mac: MAC.into(),
            relays: vec![0, 1],
        }],
        limits: vec![
            RelayLimit {
                master: M.into(),
                slave_mac: MAC.into(),
                relay: 0,
                max_on_seconds: Some(300),
                min_off_seconds: Some(10),
            },
            RelayLimit {
                master: M.into(),
                slave_mac: MAC.into(),
                relay: 5,
                max_on_seconds: None,
                min_off_seconds: Some(60),
            },
        ],
        default_max_on_seconds: None,
    }
}

fn req(source: Source, priority: i32, switches: Vec<(u8, Switch)>) -> SwitchRequest {
    SwitchRequest {
        source,
        priority,
        master: M.into(),
        slave_mac: MAC.into(),
        switches,
    }
}

fn on(d: u32) -> Switch {
    Switch::On { duration_s: d }
}

fn r(relay: u8) -> RelayRef {
    RelayRef::new(M, MAC, relay)
}

/// check + apply, panicking on refusal (test helper).
fn run(s: &mut Safety, rq: SwitchRequest, now: i64) -> Plan {
    let plan = s.check(&rq, now).unwrap();
    s.apply(&plan, now);
    plan
}

#[test]
fn validate_accepts_good_config() {
    interlocks().validate().unwrap();
    Interlocks::default().validate().unwrap();
}

#[test]
fn validate_refuses_bad_groups_and_limits() {
    let mut i = interlocks();
    i.mutex_groups[0].relays = vec![1, 1];
    assert_eq!(
        i.validate().unwrap_err().to_string(),
        "mutex group 'motor': relay 1 listed twice"
    );
    i.mutex_groups[0].relays = vec![1];
    assert_eq!(
        i.validate().unwrap_err().to_string(),
        "mutex group 'motor': needs at least 2 distinct relays"
    );
    i.mutex_groups[0].relays = vec![1, 16];
    assert_eq!(
        i.validate().unwrap_err().to_string(),
        "mutex group 'motor': relay 16 out of 0..=15"
    );
    let mut i = interlocks();
    i.mutex_groups[0].slave_mac = "nope".into();
    assert!(i.validate().unwrap_err().to_string().contains("'motor'"));
    let mut i = interlocks();
    i.mutex_groups.push(i.mutex_groups[0].clone());
    assert_eq!(
        i.validate().unwrap_err().to_string(),
        "mutex group 'motor': defined twice"
    );
    let mut i = interlocks();
    i.limits[0].max_on_seconds = Some(0);
    assert_eq!(
        i.validate().unwrap_err().to_string(),
        "limit of relay 0 on AA:BB:CC:DD:EE:01: max_on_seconds must be > 0"
    );
    let mut i = interlocks();
    i.limits[1].relay = 20;
    assert!(i.validate().unwrap_err().to_string().contains("relay 20"));
    let mut i = interlocks();
    i.default_max_on_seconds = Some(0);
    assert!(i.validate().is_err());
}

#[test]
fn interlocks_deserialize_from_toml_shaped_json() {
    let i: Interlocks = serde_json::from_value(serde_json::json!({
        "mutex_groups": [{"name": "m", "master": M, "slave_mac": MAC, "relays": [2, 3]}],
        "limits": [{"master": M, "slave_mac": MAC, "relay": 2, "max_on_seconds": 60}]
    }))
    .unwrap();
    i.validate().unwrap();
    assert_eq!(i.limits[0].min_off_seconds, None);
    assert_eq!(i.default_max_on_seconds, None);
}

#[test]
fn interlocks_refuse_unknown_keys() {
    let e = serde_json::from_value::<Interlocks>(serde_json::json!({
        "limits": [{"master": M, "slave_mac": MAC, "relay": 2, "max_on_second": 60}]
    }))
    .unwrap_err();
    assert!(e.to_string().contains("max_on_second"), "{e}");
}

#[test]
fn invalid_config_refuses_ons_but_allows_offs() {
    let mut i = interlocks();
    i.limits[0].max_on_seconds = Some(0);
    let s = Safety::new(i.clone());
    assert!(Safety::try_new(i).is_err());
    let e = s
        .check(&req(Source::Manual, 50, vec![(3, on(1))]), 0)
        .unwrap_err();
    assert!(matches!(e, Refusal::Invalid(_)), "{e}");
    s.check(&req(Source::Manual, 50, vec![(3, Switch::Off)]), 0)
        .unwrap();
}

#[test]
fn mutex_peer_goes_off_first_in_the_same_plan() {
    let s = Safety::new(interlocks());
    let plan = s
        .check(&req(Source::Manual, 50, vec![(0, on(60))]), 0)
        .unwrap();
    let order: Vec<(u8, bool)> = plan.switches.iter().map(|p| (p.relay, p.on)).collect();
    assert_eq!(order, vec![(1, false), (0, true)]);
    assert_eq!(
        plan.summary(),
        "interlocks ok; relay 1 off (mutex 'motor'); relay 0 on 60 s"
    );
    assert_eq!(plan.notes, vec!["mutex group 'motor': relay 1 off first"]);
}

#[test]
fn offs_are_ordered_before_ons() {
    let s = Safety::new(interlocks());
    let plan = s
        .check(
            &req(Source::Manual, 50, vec![(3, on(5)), (4, Switch::Off)]),
            0,
        )
        .unwrap();
    let order: Vec<(u8, bool)> = plan.switches.iter().map(|p| (p.relay, p.on)).collect();
    assert_eq!(order, vec![(4, false), (3, true)]);
}

#[test]
fn two_relays_of_one_group_on_is_a_mutex_conflict() {
    let s = Safety::new(interlocks());
    let e = s
        .check(&req(Source::Manual, 50, vec![(0, on(5)), (1, on(5))]), 0)
        .unwrap_err();
    assert_eq!(
        e,
        Refusal::MutexConflict {
            group: "motor".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "relays of mutex group 'motor' cannot be switched on together"
    );
}

#[test]
fn mutex_peer_held_higher_refuses_the_whole_request() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Rule, 80, vec![(1, on(0))]), 0);
    let before = s.snapshot();
    let e = s
        .check(&req(Source::Manual, 50, vec![(3, on(5)), (0, on(5))]), 1000)
        .unwrap_err();
    assert_eq!(
        e,
        Refusal::HeldByHigherPriority {
            relay: 1,
            holder_priority: 80,
            holder: Source::Rule
        }
    );
    assert_eq!(
        e.to_string(),
        "relay 1 is held by rule at priority 80, higher than this request's"
    );
    assert_eq!(s.snapshot(), before);
}

#[test]
fn holds_refuse_lower_and_allow_equal_or_higher() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Rule, 60, vec![(3, on(100))]), 0);
    for sw in [Switch::Off, on(5)] {
        assert!(matches!(
            s.check(&req(Source::Polling, 59, vec![(3, sw)]), 1),
            Err(Refusal::HeldByHigherPriority { relay: 3, .. })
        ));
    }
    s.check(&req(Source::Manual, 60, vec![(3, Switch::Off)]), 1)
        .unwrap();
    run(&mut s, req(Source::Manual, 70, vec![(3, on(10))]), 1);
    // The hold now belongs to the newer, higher request.
    assert!(
        s.check(&req(Source::Rule, 60, vec![(3, Switch::Off)]), 2)
            .is_err()
    );
    // Safety ignores holds.
    s.check(&req(Source::Safety, 0, vec![(3, Switch::Off)]), 2)
        .unwrap();
}

#[test]
fn hold_ends_when_observed_off() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Rule, 90, vec![(3, on(0))]), 0);
    s.observe(M, MAC, &[false; 16], 1000);
    s.check(&req(Source::Polling, 10, vec![(3, on(1))]), 2000)
        .unwrap();
}

#[test]
fn min_off_time_refuses_with_remaining_seconds() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Manual, 50, vec![(5, on(0))]), 0);
    run(
        &mut s,
        req(Source::Manual, 50, vec![(5, Switch::Off)]),
        10_000,
    );
    let e = s
        .check(&req(Source::Manual, 50, vec![(5, on(0))]), 10_000 + 20_500)
        .unwrap_err();
    assert_eq!(
        e,
        Refusal::MinOffTime {
            relay: 5,
            remaining_s: 40
        }
    );
    assert_eq!(
        e.to_string(),
        "relay 5 must stay off for another 40 s (minimum off-time)"
    );
    s.check(&req(Source::Manual, 50, vec![(5, on(0))]), 70_000)
        .unwrap();
}

#[test]
fn off_of_an_off_relay_keeps_its_off_time() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Manual, 50, vec![(5, on(0))]), 0);
    run(
        &mut s,
        req(Source::Manual, 50, vec![(5, Switch::Off)]),
        1_000,
    );
    // Idempotent off: still produced, does not restart the min-off.
    let p = run(
        &mut s,
        req(Source::Manual, 50, vec![(5, Switch::Off)]),
        30_000,
    );
    assert_eq!(p.switches.len(), 1);
    s.check(&req(Source::Manual, 50, vec![(5, on(0))]), 61_000)
        .unwrap();
}

#[test]
fn max_on_time_caps_duration_and_due_switches_off() {
    let mut s = Safety::new(interlocks());
    let p = run(&mut s, req(Source::Manual, 50, vec![(0, on(600))]), 0);
    let on0 = p.switches.iter().find(|x| x.on).unwrap();
    assert_eq!(on0.duration_s, 300);
    assert_eq!(p.notes[1], "relay 0: max on-time 300 s caps 600 s to 300 s");
    assert!(
        p.summary()
            .ends_with("relay 0 on 300 s (max on-time 300 s)")
    );
    let p0 = s
        .check(&req(Source::Manual, 50, vec![(0, on(0))]), 0)
        .unwrap();
    assert!(p0.notes.iter().any(|n| n.contains("caps 'until off'")));
    assert_eq!(s.next_deadline_ms(), Some(300_000));
    assert_eq!(s.relays_on(), vec![(r(0), Some(300_000))]);
    assert!(s.due(299_999).is_empty());
    let plans = s.due(300_000);
    assert_eq!(plans.len(), 1);
    assert_eq!(plans[0].source, Source::Safety);
    assert_eq!(plans[0].switches[0].relay, 0);
    assert!(!plans[0].switches[0].on);
    assert!(s.relays_on().is_empty());
}

#[test]
fn switching_on_again_does_not_restart_max_on() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Manual, 50, vec![(0, on(0))]), 0);
    let p = run(&mut s, req(Source::Manual, 50, vec![(0, on(0))]), 200_000);
    assert_eq!(p.switches.last().unwrap().duration_s, 100);
    assert_eq!(s.next_deadline_ms(), Some(300_000));
    let e = s
        .check(&req(Source::Manual, 50, vec![(0, on(0))]), 299_500)
        .unwrap_err();
    assert_eq!(
        e,
        Refusal::MaxOnTime {
            relay: 0,
            max_on_s: 300
        }
    );
    assert!(e.to_string().contains("maximum on-time of 300 s"));
}

#[test]
fn duration_gives_a_deadline_without_max_on() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Rule, 50, vec![(7, on(30))]), 1_000);
    assert_eq!(s.next_deadline_ms(), Some(31_000));
    run(&mut s, req(Source::Rule, 50, vec![(8, on(0))]), 1_000);
    assert_eq!(s.relays_on().len(), 2);
    assert_eq!(s.due(31_000).len(), 1);
    // Unconfirmed offs are sent again.
    assert_eq!(s.next_deadline_ms(), Some(31_000 + OFF_RETRY_MS));
    s.observe(M, MAC, &[false; 16], 32_000);
    assert_eq!(s.next_deadline_ms(), None);
}

#[test]
fn default_max_on_applies_to_relays_switched_on_elsewhere() {
    let mut i = interlocks();
    i.default_max_on_seconds = Some(60);
    let mut s = Safety::new(i);
    let mut states = [false; 16];
    states[9] = true;
    s.observe(M, "aa:bb:cc:dd:ee:01", &states, 5_000);
    assert_eq!(s.relays_on(), vec![(r(9), Some(65_000))]);
    // A later report does not restart it.
    s.observe(M, MAC, &states, 30_000);
    assert_eq!(s.next_deadline_ms(), Some(65_000));
    let plans = s.due(65_000);
    assert_eq!(plans[0].switches[0].relay, 9);
}

#[test]
fn emergency_stop_latches_refuses_ons_allows_offs() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Rule, 90, vec![(3, on(0))]), 0);
    assert!(s.emergency_stop("water on the floor", "operator", 1_000));
    assert!(!s.emergency_stop("again", "operator", 1_001));
    assert_eq!(s.emergency().unwrap().reason, "water on the floor");
    assert_eq!(s.emergency().unwrap().since_ms, 1_000);
    let plans = s.due(1_001);
    let offs: Vec<u8> = plans[0].switches.iter().map(|p| p.relay).collect();
    // Relay 3 (on) and the configured relays 0, 1, 5.
    assert_eq!(offs, vec![0, 1, 3, 5]);
    assert!(plans[0].switches.iter().all(|p| !p.on));
    let e = s
        .check(&req(Source::Manual, 100, vec![(4, on(1))]), 2_000)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "emergency stop is latched (water on the floor): only switching off is allowed until it is reset"
    );
    // Offs by anyone, holds were cleared.
    s.check(&req(Source::Polling, 0, vec![(3, Switch::Off)]), 2_000)
        .unwrap();
    assert!(s.reset("operator", 3_000));
    assert!(!s.reset("operator", 3_001));
    assert!(s.relays_on().is_empty());
    s.check(&req(Source::Manual, 50, vec![(4, on(1))]), 4_000)
        .unwrap();
}

#[test]
fn relay_seen_on_during_the_latch_is_switched_off() {
    let mut s = Safety::new(Interlocks::default());
    s.emergency_stop("test", "me", 0);
    let mut states = [false; 4];
    states[2] = true;
    s.observe(M, MAC, &states, 10);
    let plans = s.due(10);
    assert_eq!(plans[0].switches.len(), 1);
    assert_eq!(plans[0].switches[0].relay, 2);
}

#[test]
fn invalid_requests_are_refused() {
    let s = Safety::new(interlocks());
    let cases = [
        (
            req(Source::Manual, 101, vec![(0, Switch::Off)]),
            "priority 101 out of 0..=100",
        ),
        (
            req(Source::Manual, 5, vec![]),
            "0 switches (1..=16 per request)",
        ),
        (
            req(Source::Manual, 5, vec![(16, Switch::Off)]),
            "relay 16 out of 0..=15",
        ),
        (
            req(Source::Manual, 5, vec![(2, Switch::Off), (2, on(1))]),
            "relay 2 appears twice",
        ),
        (
            req(Source::Safety, 5, vec![(2, on(1))]),
            "the safety source only switches off",
        ),
    ];
    for (rq, msg) in cases {
        assert_eq!(
            s.check(&rq, 0).unwrap_err().to_string(),
            format!("invalid request: {msg}")
        );
    }
    let mut bad = req(Source::Manual, 5, vec![(0, Switch::Off)]);
    bad.slave_mac = "AA:BB".into();
    assert!(
        s.check(&bad, 0)
            .unwrap_err()
            .to_string()
            .contains("'AA:BB'")
    );
    bad.slave_mac = MAC.into();
    bad.master = " ".into();
    assert!(s.check(&bad, 0).is_err());
}

#[test]
fn mac_case_does_not_matter() {
    let mut s = Safety::new(interlocks());
    let mut rq = req(Source::Manual, 50, vec![(0, on(10))]);
    rq.slave_mac = MAC.to_ascii_lowercase();
    let p = run(&mut s, rq, 0);
    assert_eq!(p.slave_mac, MAC);
    assert_eq!(p.switches[0].relay, 1, "mutex group found despite the case");
}

#[test]
fn snapshot_restore_keeps_deadlines_and_latch() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Rule, 50, vec![(7, on(30))]), 0);
    s.emergency_stop("x", "y", 1);
    let snap = s.snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    let mut t = Safety::new(interlocks());
    t.restore(serde_json::from_str(&json).unwrap());
    assert_eq!(t.snapshot(), snap);
    assert_eq!(t.emergency().unwrap().reason, "x");
    assert_eq!(t.next_deadline_ms(), s.next_deadline_ms());

    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Rule, 50, vec![(7, on(30))]), 0);
    let mut t = Safety::new(interlocks());
    t.restore(s.snapshot());
    // Down past the deadline: due at once after the restart.
    assert_eq!(t.due(100_000).len(), 1);
}

#[test]
fn restoring_a_latched_snapshot_with_relays_on_switches_them_off() {
    let mut s = Safety::new(interlocks());
    run(&mut s, req(Source::Rule, 50, vec![(7, on(0))]), 0);
    let mut snap = s.snapshot();
    snap.emergency = Some(EmergencyLatch {
        reason: "x".into(),
        by: "y".into(),
        since_ms: 5,
    });
    let mut t = Safety::new(interlocks());
    t.restore(snap);
    assert!(t.relays_on().is_empty());
    assert_eq!(t.due(6)[0].switches[0].relay, 7);
}

#[test]
fn apply_during_latch_switches_straight_back_off() {
    let mut s = Safety::new(interlocks());
    let plan = s
        .check(&req(Source::Manual, 50, vec![(3, on(0))]), 0)
        .unwrap();
    s.emergency_stop("x", "y", 1);
    s.due(1);
    s.apply(&plan, 2);
    assert!(s.relays_on().is_empty());
    assert_eq!(s.due(2)[0].switches[0].relay, 3);
}

#[test]
fn check_never_panics_on_extreme_times() {
    let mut s = Safety::new(interlocks());
    for now in [i64::MIN, -1, 0, i64::MAX] {
        for sw in [on(u32::MAX), on(0), Switch::Off] {
            for relay in [0, 5, 15] {
                if let Ok(p) = s.check(&req(Source::Manual, 100, vec![(relay, sw)]), now) {
                    s.apply(&p, now);
                }
                s.due(now);
                s.observe(M, MAC, &[true; 20], now);
            }
        }
    }
}

// --- hold controls ---

#[test]
fn hold_press_release() {
    let mut h = Holds::new();
    let rq = h
        .press(RelayRef::new(M, "aa:bb:cc:dd:ee:01", 4), 30, "ana", 0)
        .unwrap();
    assert_eq!(rq.source, Source::Hold);
    assert_eq!(rq.priority, HOLD_PRIORITY);
    assert_eq!(rq.slave_mac, MAC);
    assert_eq!(rq.switches, vec![(4, on(30))]);
    assert!(h.is_held(&r(4)));
    assert_eq!(h.next_deadline_ms(), Some(30_000));
    let off = h.release(&r(4), 1_000).unwrap();
    assert_eq!(off.switches, vec![(4, Switch::Off)]);
    assert!(h.release(&r(4), 1_000).is_none());
    assert_eq!(h.next_deadline_ms(), None);
}

#[test]
fn hold_already_held_and_bad_inputs_refused() {
    let mut h = Holds::new();
    h.press(r(4), 30, "ana", 0).unwrap();
    assert_eq!(
        h.press(r(4), 30, "bo", 1).unwrap_err().to_string(),
        format!("{} is already held by ana", r(4))
    );
    assert_eq!(
        h.press(r(5), 0, "bo", 1).unwrap_err(),
        HoldError::BadDuration(0)
    );
    assert_eq!(
        h.press(r(5), 3601, "bo", 1).unwrap_err().to_string(),
        "hold maximum 3601 s out of 1..=3600"
    );
    assert!(matches!(
        h.press(r(16), 5, "bo", 1),
        Err(HoldError::InvalidRelay(_))
    ));
    assert!(matches!(
        h.press(RelayRef::new(M, "zz", 1), 5, "bo", 1),
        Err(HoldError::InvalidRelay(_))
    ));
    assert!(h.cancel(&r(4)));
    assert!(!h.is_held(&r(4)));
}

#[test]
fn hold_due_ends_holds_at_their_maximum() {
    let mut h = Holds::new();
    h.press(r(4), 10, "ana", 0).unwrap();
    h.press(r(6), 20, "ana", 0).unwrap();
    assert!(h.due(9_999).is_empty());
    let offs = h.due(10_000);
    assert_eq!(offs.len(), 1);
    assert_eq!(offs[0].switches, vec![(4, Switch::Off)]);
    assert_eq!(h.next_deadline_ms(), Some(20_000));
    assert!(h.release(&r(4), 10_001).is_none());
}

#[test]
fn hold_request_passes_the_arbiter_and_holds_the_relay() {
    let mut s = Safety::new(interlocks());
    let mut h = Holds::new();
    let rq = h.press(r(3), 60, "ana", 0).unwrap();
    run(&mut s, rq, 0);
    assert!(
        s.check(&req(Source::Rule, 50, vec![(3, Switch::Off)]), 1)
            .is_err()
    );
    let off = h.release(&r(3), 2_000).unwrap();
    run(&mut s, off, 2_000);
    assert!(s.relays_on().is_empty());
}
