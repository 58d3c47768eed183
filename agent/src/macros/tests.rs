use super::*;
use proptest::prelude::*;
use serde_json::{Value, json};

fn relay_action(seq: i64, relay: i64, action: &str, delay_ms: i64) -> Value {
    json!({
        "id": format!("a{seq}"), "macro_id": "m", "sequence": seq, "action_type": "relay",
        "action_target": null, "delay_ms": delay_ms, "condition_check": null,
        "action_payload": {"master_device_id": "master-1", "slave_mac_address": "aa:bb:cc:dd:ee:01",
                           "relay_number": relay, "action": action, "duration_seconds": 30}
    })
}

fn row(id: &str, actions: Vec<Value>) -> Value {
    json!({"id": id, "owner_id": "o", "agent_id": "g", "name": format!("macro {id}"),
           "description": null, "enabled": true, "revision": 3, "macro_actions": actions})
}

fn nested(seq: i64, target: &str) -> Value {
    json!({"sequence": seq, "action_type": "macro", "action_target": target})
}

fn def(id: &str, actions: Vec<Value>) -> MacroDef {
    parse_macro(&row(id, actions)).unwrap()
}

fn err(v: Value) -> String {
    parse_macro(&v).unwrap_err().to_string()
}

#[test]
fn parses_every_step_kind_in_sequence_order() {
    let d = parse_macro(&row(
        "m",
        vec![
            json!({"sequence": 40, "action_type": "macro", "action_target": "other"}),
            relay_action(10, 3, "on", 0),
            json!({"sequence": 20, "action_type": "delay", "delay_ms": 5000}),
            json!({"sequence": 30, "action_type": "mqtt_publish",
                   "action_payload": {"topic": "farm/alert", "payload": {"a": 1}, "retain": true},
                   "condition_check": {"sensor": "t", "op": ">", "value": 3}}),
            relay_action(50, 3, "off", 0),
        ],
    ))
    .unwrap();
    assert_eq!(d.id, "m");
    assert_eq!(d.name, "macro m");
    assert!(d.enabled);
    assert_eq!(d.revision, 3);
    let seqs: Vec<i32> = d.steps.iter().map(|s| s.sequence).collect();
    assert_eq!(seqs, vec![10, 20, 30, 40, 50]);
    assert_eq!(
        d.steps[0].kind,
        StepKind::Relay {
            master: "master-1".into(),
            slave_mac: "AA:BB:CC:DD:EE:01".into(),
            relay: 3,
            on: true,
            duration_s: 30
        }
    );
    assert_eq!(d.steps[1].kind, StepKind::Delay);
    assert_eq!(d.steps[1].delay_ms, 5000);
    assert_eq!(
        d.steps[2].kind,
        StepKind::MqttPublish {
            topic: "farm/alert".into(),
            payload: json!({"a": 1}),
            retain: true
        }
    );
    assert!(d.steps[2].condition.is_some());
    assert_eq!(
        d.steps[3].kind,
        StepKind::Macro {
            macro_id: "other".into()
        }
    );
    // An off never carries a duration.
    assert!(matches!(
        d.steps[4].kind,
        StepKind::Relay {
            on: false,
            duration_s: 0,
            ..
        }
    ));
}

#[test]
fn parse_errors_name_the_step() {
    assert_eq!(err(json!([1])), "macro row is not a JSON object");
    assert_eq!(
        err(row(
            "m",
            vec![relay_action(10, 1, "on", 0), relay_action(30, 22, "on", 0)]
        )),
        "step 2 (sequence 30): relay_number 22 out of 0..=15"
    );
    assert_eq!(
        err(row(
            "m",
            vec![json!({"sequence": 5, "action_type": "teleport"})]
        )),
        "step 1 (sequence 5): unknown action_type 'teleport' (relay, delay, mqtt_publish or macro)"
    );
    let mut no_mac = relay_action(10, 1, "on", 0);
    no_mac["action_payload"]
        .as_object_mut()
        .unwrap()
        .remove("slave_mac_address");
    assert_eq!(
        err(row("m", vec![no_mac])),
        "step 1 (sequence 10): relay: slave_mac_address missing"
    );
    assert_eq!(
        err(row("m", vec![relay_action(10, 1, "on", -5)])),
        "step 1 (sequence 10): delay_ms -5 out of 0..=3600000"
    );
    assert_eq!(
        err(row("m", vec![relay_action(10, 1, "toggle", 0)])),
        "step 1 (sequence 10): relay: action must be \"on\" or \"off\""
    );
    assert_eq!(err(row("m", vec![json!("relay")])), "step 1: not an object");
    assert_eq!(
        err(row(
            "m",
            vec![json!({"sequence": 1001, "action_type": "delay"})]
        )),
        "step 1: sequence 1001 out of 0..=1000"
    );
    assert_eq!(
        err(row(
            "m",
            vec![relay_action(10, 1, "on", 0), relay_action(10, 2, "on", 0)]
        )),
        "step 2 (sequence 10): sequence used by two steps"
    );
    assert_eq!(
        err(row(
            "m",
            vec![json!({"sequence": 1, "action_type": "macro"})]
        )),
        "step 1 (sequence 1): macro: action_target (the nested macro's id) missing"
    );
    assert!(
        err(row(
            "m",
            vec![json!({"sequence": 1, "action_type": "mqtt_publish", "action_payload": {"topic": "a/#"}})]
        ))
        .contains("not a publishable topic")
    );
    assert_eq!(
        err(json!({"name": "x"})),
        "macro row: id: missing or not a non-empty string"
    );
    assert_eq!(
        err(json!({"id": "x", "enabled": "yes"})),
        "macro row: enabled: not true or false"
    );
}

#[test]
fn missing_enabled_means_disabled_and_no_actions_is_empty() {
    let d = parse_macro(&json!({"id": "x"})).unwrap();
    assert!(!d.enabled);
    assert!(d.steps.is_empty());
}

#[test]
fn parse_macros_splits_good_and_bad() {
    let (good, bad) = parse_macros(&json!([row("a", vec![]), {"id": "b", "macro_actions": 3}, 7]));
    assert_eq!(good.len(), 1);
    assert_eq!(bad.len(), 2);
    assert_eq!(bad[0].0, "b");
    assert_eq!(bad[1].0, "#2");
}

fn catalog(defs: Vec<MacroDef>) -> (MacroCatalog, Vec<(String, MacroError)>) {
    MacroCatalog::new(defs)
}

#[test]
fn self_cycle_is_refused() {
    let (c, bad) = catalog(vec![def("a", vec![nested(1, "a")])]);
    assert!(c.get("a").is_none());
    assert_eq!(bad[0].1.to_string(), "macro cycle: a -> a");
}

#[test]
fn two_and_three_cycles_are_refused_others_kept() {
    let (c, bad) = catalog(vec![
        def("a", vec![nested(1, "b")]),
        def("b", vec![nested(1, "a")]),
        def("x", vec![nested(1, "y")]),
        def("y", vec![nested(1, "z")]),
        def("z", vec![nested(1, "x")]),
        def("user", vec![nested(1, "x")]),
        def("fine", vec![relay_action(1, 1, "on", 0)]),
    ]);
    let bad: BTreeMap<String, String> = bad.into_iter().map(|(k, e)| (k, e.to_string())).collect();
    assert_eq!(bad["a"], "macro cycle: a -> b -> a");
    assert_eq!(bad["b"], "macro cycle: a -> b -> a");
    assert_eq!(bad["x"], "macro cycle: x -> y -> z -> x");
    assert!(bad["z"].starts_with("macro cycle:"));
    assert!(
        bad["user"].starts_with("nested macro 'x' is refused: macro cycle: x -> y -> z -> x"),
        "{}",
        bad["user"]
    );
    assert_eq!(c.ids().collect::<Vec<_>>(), vec!["fine"]);
    assert!(c.refused("a").is_some());
}

use std::collections::BTreeMap;

#[test]
fn diamond_is_fine_unknown_nested_refused() {
    let (c, bad) = catalog(vec![
        def("top", vec![nested(1, "l"), nested(2, "r")]),
        def("l", vec![nested(1, "bottom")]),
        def("r", vec![nested(1, "bottom")]),
        def("bottom", vec![relay_action(1, 1, "on", 0)]),
        def("lost", vec![nested(7, "nowhere")]),
    ]);
    assert_eq!(bad.len(), 1);
    assert_eq!(
        bad[0].1.to_string(),
        "step sequence 7 nests unknown macro 'nowhere'"
    );
    assert!(c.get("top").is_some());
}

#[test]
fn nesting_deeper_than_eight_is_refused() {
    // m0 -> m1 -> ... -> m9: m0 nests 9 levels, m1 exactly 8.
    let mut defs = Vec::new();
    for i in 0..10 {
        let steps = if i < 9 {
            vec![nested(1, &format!("m{}", i + 1))]
        } else {
            vec![]
        };
        defs.push(def(&format!("m{i}"), steps));
    }
    let (c, bad) = catalog(defs);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].0, "m0");
    assert_eq!(
        bad[0].1.to_string(),
        "nesting deeper than 8 levels: m0 -> m1 -> m2 -> m3 -> m4 -> m5 -> m6 -> m7 -> m8 -> m9"
    );
    assert!(c.get("m1").is_some());
}

#[test]
fn long_chains_do_not_overflow_and_shallow_tails_stay() {
    let mut defs = Vec::new();
    for i in 0..5000 {
        defs.push(def(
            &format!("c{i:04}"),
            vec![nested(1, &format!("c{:04}", i + 1))],
        ));
    }
    defs.push(def("c5000", vec![]));
    let (c, bad) = catalog(defs);
    assert_eq!(bad.len(), 5001 - 9);
    assert!(c.get("c4995").is_some());
}

#[test]
fn duplicate_ids_are_refused() {
    let (c, bad) = catalog(vec![def("a", vec![]), def("a", vec![])]);
    assert!(c.get("a").is_none());
    assert_eq!(bad[0].1.to_string(), "macro 'a' is defined twice");
}

fn no_check() -> impl FnMut(&Value) -> Result<bool, String> {
    |_| Ok(true)
}

fn relays(effects: &[MacroEffect]) -> Vec<(u8, bool)> {
    effects
        .iter()
        .filter_map(|e| match e {
            MacroEffect::Switch { relay, on, .. } => Some((*relay, *on)),
            _ => None,
        })
        .collect()
}

#[test]
fn run_with_delays_runs_steps_at_the_right_times() {
    let (c, _) = catalog(vec![def(
        "m",
        vec![
            relay_action(1, 1, "on", 0),
            json!({"sequence": 2, "action_type": "delay", "delay_ms": 5000}),
            relay_action(3, 2, "on", 1000),
            json!({"sequence": 4, "action_type": "mqtt_publish", "action_payload": {"topic": "t", "payload": "done"}}),
        ],
    )]);
    let mut r = MacroRunner::new();
    let id = r.start(&c, "m", "ana", 10_000).unwrap();
    assert_eq!(r.running(), vec![("m".to_string(), id)]);
    assert_eq!(r.next_deadline_ms(), Some(10_000));
    let e = r.poll(&c, 10_000, &mut no_check());
    assert_eq!(relays(&e), vec![(1, true)]);
    // Paused after the switch; the delay step is due now, then waits 5 s.
    assert_eq!(r.next_deadline_ms(), Some(10_000));
    assert!(r.poll(&c, 10_000, &mut no_check()).is_empty());
    assert_eq!(r.next_deadline_ms(), Some(15_000));
    assert!(r.poll(&c, 14_999, &mut no_check()).is_empty());
    assert!(r.poll(&c, 15_000, &mut no_check()).is_empty());
    assert_eq!(r.next_deadline_ms(), Some(16_000));
    let e = r.poll(&c, 16_000, &mut no_check());
    assert_eq!(relays(&e), vec![(2, true)]);
    let e = r.poll(&c, 16_000, &mut no_check());
    assert!(
        matches!(&e[0], MacroEffect::Publish { topic, payload, retain: false, .. } if topic == "t" && payload == "done")
    );
    assert_eq!(
        e[1],
        MacroEffect::Finished {
            macro_id: "m".into(),
            run_id: id,
            outcome: MacroOutcome::Completed
        }
    );
    assert!(r.running().is_empty());
    assert_eq!(r.next_deadline_ms(), None);
}

#[test]
fn false_condition_skips_and_error_fails() {
    let mut skipped = relay_action(1, 1, "on", 0);
    skipped["condition_check"] = json!({"skip": true});
    let mut failing = relay_action(3, 3, "on", 0);
    failing["condition_check"] = json!({"broken": true});
    let (c, _) = catalog(vec![def(
        "m",
        vec![skipped, relay_action(2, 2, "on", 0), failing],
    )]);
    let mut check = |c: &Value| {
        if c.get("broken").is_some() {
            Err("sensor t unknown".to_string())
        } else {
            Ok(c.get("skip").is_none())
        }
    };
    let mut r = MacroRunner::new();
    r.start(&c, "m", "ana", 0).unwrap();
    let e = r.poll(&c, 0, &mut check);
    assert!(
        matches!(&e[0], MacroEffect::Skipped { sequence: 1, why, .. } if why == "step sequence 1: condition is false")
    );
    assert_eq!(relays(&e), vec![(2, true)]);
    let e = r.poll(&c, 0, &mut check);
    assert_eq!(
        e,
        vec![MacroEffect::Finished {
            macro_id: "m".into(),
            run_id: 1,
            outcome: MacroOutcome::Failed(
                "step sequence 3: condition could not be evaluated: sensor t unknown".into()
            )
        }]
    );
}

#[test]
fn cancel_stops_further_steps() {
    let (c, _) = catalog(vec![def(
        "m",
        vec![
            relay_action(1, 1, "on", 0),
            relay_action(2, 1, "off", 60_000),
        ],
    )]);
    let mut r = MacroRunner::new();
    let id = r.start(&c, "m", "ana", 0).unwrap();
    r.poll(&c, 0, &mut no_check());
    assert_eq!(
        r.cancel("m", 1_000),
        Some(MacroEffect::Finished {
            macro_id: "m".into(),
            run_id: id,
            outcome: MacroOutcome::Cancelled
        })
    );
    assert!(r.poll(&c, 100_000, &mut no_check()).is_empty());
    assert!(r.cancel("m", 1_000).is_none());
    // It can be started again afterwards, with a new run id.
    assert_eq!(r.start(&c, "m", "ana", 2_000).unwrap(), id + 1);
}

#[test]
fn second_start_while_running_is_refused() {
    let (c, _) = catalog(vec![def("m", vec![relay_action(1, 1, "on", 5_000)])]);
    let mut r = MacroRunner::new();
    let id = r.start(&c, "m", "ana", 0).unwrap();
    let e = r.start(&c, "m", "bo", 1).unwrap_err();
    assert_eq!(
        e,
        MacroError::AlreadyRunning {
            macro_id: "m".into(),
            run_id: id
        }
    );
    assert_eq!(
        e.to_string(),
        format!("macro 'm' is already running (run {id})")
    );
}

#[test]
fn start_refusals() {
    let mut off = def("off", vec![]);
    off.enabled = false;
    let (c, _) = catalog(vec![
        off,
        def("cyc", vec![nested(1, "cyc")]),
        def("uses_off", vec![nested(1, "off")]),
    ]);
    let mut r = MacroRunner::new();
    assert_eq!(
        r.start(&c, "nope", "a", 0).unwrap_err().to_string(),
        "unknown macro 'nope'"
    );
    assert_eq!(
        r.start(&c, "off", "a", 0).unwrap_err().to_string(),
        "macro 'off' is disabled"
    );
    assert_eq!(
        r.start(&c, "cyc", "a", 0).unwrap_err().to_string(),
        "macro 'cyc' is refused: macro cycle: cyc -> cyc"
    );
    assert_eq!(
        r.start(&c, "uses_off", "a", 0).unwrap_err().to_string(),
        "macro 'uses_off' is refused: nested macro 'off' is disabled"
    );
    assert!(r.running().is_empty());
}

#[test]
fn abort_stops_the_run_with_the_reason() {
    let (c, _) = catalog(vec![def(
        "m",
        vec![relay_action(1, 1, "on", 0), relay_action(2, 2, "on", 0)],
    )]);
    let mut r = MacroRunner::new();
    r.start(&c, "m", "ana", 0).unwrap();
    let e = r.poll(&c, 0, &mut no_check());
    assert_eq!(relays(&e), vec![(1, true)]);
    let req = e[0].switch_request(40).unwrap();
    assert_eq!(req.source, crate::safety::Source::Macro);
    assert_eq!(req.priority, 40);
    let f = r.abort(
        "m",
        "relay 1 must stay off for another 5 s (minimum off-time)",
    );
    assert!(
        matches!(f, Some(MacroEffect::Finished { outcome: MacroOutcome::Failed(ref why), .. }) if why.contains("minimum off-time"))
    );
    // The second relay is never emitted.
    assert!(r.poll(&c, 0, &mut no_check()).is_empty());
    assert!(r.abort("m", "x").is_none());
}

#[test]
fn nested_macros_run_inline_and_do_not_block_their_own_start() {
    let (c, _) = catalog(vec![
        def(
            "outer",
            vec![
                relay_action(1, 1, "on", 0),
                nested(2, "inner"),
                relay_action(3, 3, "on", 0),
            ],
        ),
        def("inner", vec![relay_action(1, 2, "on", 100)]),
    ]);
    let mut r = MacroRunner::new();
    r.start(&c, "outer", "ana", 0).unwrap();
    let mut all = Vec::new();
    let mut now = 0;
    while let Some(d) = r.next_deadline_ms() {
        now = now.max(d);
        all.extend(r.poll(&c, now, &mut no_check()));
        if r.running().iter().all(|(m, _)| m != "inner") && now == 0 {
            // The nested macro is not a run of its own: it can be started separately.
            r.start(&c, "inner", "bo", 0).unwrap();
        }
    }
    let outer: Vec<(u8, bool)> = all
        .iter()
        .filter(|e| matches!(e, MacroEffect::Switch { macro_id, .. } if macro_id == "outer"))
        .filter_map(|e| match e {
            MacroEffect::Switch { relay, on, .. } => Some((*relay, *on)),
            _ => None,
        })
        .collect();
    assert_eq!(outer, vec![(1, true), (2, true), (3, true)]);
    assert_eq!(now, 100);
    let finished = all
        .iter()
        .filter(|e| {
            matches!(
                e,
                MacroEffect::Finished {
                    outcome: MacroOutcome::Completed,
                    ..
                }
            )
        })
        .count();
    assert_eq!(finished, 2);
}

#[test]
fn false_condition_on_a_nested_step_skips_the_nested_macro() {
    let mut n = nested(1, "inner");
    n["condition_check"] = json!(false);
    let (c, _) = catalog(vec![
        def("outer", vec![n]),
        def("inner", vec![relay_action(1, 2, "on", 0)]),
    ]);
    let mut r = MacroRunner::new();
    r.start(&c, "outer", "ana", 0).unwrap();
    let e = r.poll(&c, 0, &mut |v: &Value| Ok(v.as_bool().unwrap_or(true)));
    assert!(relays(&e).is_empty());
    assert!(
        matches!(&e[0], MacroEffect::Skipped { why, .. } if why.contains("nested macro 'inner' not run"))
    );
    assert!(matches!(
        &e[1],
        MacroEffect::Finished {
            outcome: MacroOutcome::Completed,
            ..
        }
    ));
}

#[test]
fn disabling_a_running_macro_stops_it() {
    let (c, _) = catalog(vec![def("m", vec![relay_action(1, 1, "on", 10_000)])]);
    let mut r = MacroRunner::new();
    r.start(&c, "m", "ana", 0).unwrap();
    let mut d = c.get("m").unwrap().clone();
    d.enabled = false;
    let (c2, _) = catalog(vec![d]);
    let e = r.poll(&c2, 1, &mut no_check());
    assert!(
        matches!(&e[0], MacroEffect::Finished { outcome: MacroOutcome::Failed(w), .. } if w.contains("disabled"))
    );
}

#[test]
fn step_cap_stops_runaway_runs() {
    // 10 nested calls of a macro with 10 x 10 x ... would exceed the cap; keep it simple:
    // a fan of 4 levels x 11 nested calls each = 14641 leaf steps.
    let fan = |id: &str, child: &str| def(id, (0..11).map(|i| nested(i, child)).collect());
    let (c, bad) = catalog(vec![
        fan("l0", "l1"),
        fan("l1", "l2"),
        fan("l2", "l3"),
        fan("l3", "leaf"),
        def("leaf", vec![json!({"sequence": 0, "action_type": "delay"})]),
    ]);
    assert!(bad.is_empty());
    let mut r = MacroRunner::new();
    r.start(&c, "l0", "a", 0).unwrap();
    let e = r.poll(&c, 0, &mut no_check());
    assert!(
        matches!(e.last(), Some(MacroEffect::Finished { outcome: MacroOutcome::Failed(w), .. }) if w.contains("more than 10000 steps"))
    );
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        prop_oneof![
            Just("relay".to_string()),
            Just("delay".to_string()),
            Just("mqtt_publish".to_string()),
            Just("macro".to_string()),
            Just("on".to_string()),
            Just("AA:BB:CC:DD:EE:01".to_string()),
            ".{0,6}"
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = prop_oneof![
            Just("id".to_string()),
            Just("enabled".to_string()),
            Just("macro_actions".to_string()),
            Just("sequence".to_string()),
            Just("action_type".to_string()),
            Just("action_target".to_string()),
            Just("action_payload".to_string()),
            Just("delay_ms".to_string()),
            Just("condition_check".to_string()),
            Just("relay_number".to_string()),
            Just("slave_mac_address".to_string()),
            Just("master_device_id".to_string()),
            Just("action".to_string()),
            Just("topic".to_string()),
            ".{0,4}"
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parse_macro_never_panics(v in arb_json()) {
        let _ = parse_macro(&v);
        let (defs, _) = parse_macros(&Value::Array(vec![v]));
        let (c, _) = MacroCatalog::new(defs);
        let mut r = MacroRunner::new();
        let ids: Vec<String> = c.ids().map(str::to_string).collect();
        for id in ids {
            let _ = r.start(&c, &id, "p", 0);
        }
        for now in [0, 1_000, 4_000_000_000] {
            r.poll(&c, now, &mut |_| Ok(true));
        }
    }
}

const N: usize = 14;

/// Brute force: is `id` runnable (every nested macro known, no cycle, at most 8 levels)?
fn oracle(id: usize, graph: &[Vec<usize>], path: &mut Vec<usize>) -> bool {
    if id >= graph.len() || path.contains(&id) || path.len() > MAX_NESTING {
        return false;
    }
    path.push(id);
    let ok = graph[id].iter().all(|&c| oracle(c, graph, path));
    path.pop();
    ok
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The catalog keeps exactly the macros the brute force accepts, and each kept macro runs
    /// to completion.
    #[test]
    fn catalog_matches_brute_force(
        random in prop::collection::vec(
            prop::collection::vec(prop_oneof![6 => Just(usize::MAX), 1 => 0usize..N + 1], 0..3),
            N,
        ),
        chain in prop::collection::vec(prop::bool::weighted(0.85), N),
        skip in prop::collection::vec(prop::bool::weighted(0.2), N),
    ) {
        // Mostly forward edges (deep chains, diamonds), some arbitrary ones (cycles, unknown id N).
        let graph: Vec<Vec<usize>> = (0..N)
            .map(|i| {
                let mut kids: Vec<usize> = random[i].iter().copied().filter(|c| *c != usize::MAX).collect();
                if chain[i] && i + 1 < N {
                    kids.push(i + 1);
                }
                if skip[i] && i + 2 < N {
                    kids.push(i + 2);
                }
                kids
            })
            .collect();
        let defs: Vec<MacroDef> = graph
            .iter()
            .enumerate()
            .map(|(i, kids)| {
                let mut steps: Vec<Value> = kids.iter().enumerate()
                    .map(|(s, c)| nested(s as i64, &format!("n{c}"))).collect();
                steps.push(json!({"sequence": 100, "action_type": "delay", "delay_ms": 10}));
                def(&format!("n{i}"), steps)
            })
            .collect();
        let (c, bad) = MacroCatalog::new(defs);
        for i in 0..N {
            let want = oracle(i, &graph, &mut Vec::new());
            let id = format!("n{i}");
            prop_assert_eq!(c.get(&id).is_some(), want, "{} {:?} {:?}", id, graph, bad);
            if want {
                let mut r = MacroRunner::new();
                r.start(&c, &id, "p", 0).unwrap();
                let mut now = 0;
                let mut done = None;
                for _ in 0..100_000 {
                    let Some(d) = r.next_deadline_ms() else { break };
                    now = now.max(d);
                    for e in r.poll(&c, now, &mut |_| Ok(true)) {
                        if let MacroEffect::Finished { outcome, .. } = e {
                            done = Some(outcome);
                        }
                    }
                }
                prop_assert!(
                    matches!(done, Some(MacroOutcome::Completed) | Some(MacroOutcome::Failed(_))),
                    "{:?}", done
                );
                if let Some(MacroOutcome::Failed(w)) = done {
                    prop_assert!(w.contains("more than"), "{}", w);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Polled at its deadlines, a run emits each relay step exactly when the sum of the delays
    /// so far has passed, in sequence order, once, then completes.
    #[test]
    fn steps_run_at_their_delays(delays in prop::collection::vec(0i64..20_000, 1..12), start in 0i64..1_000_000) {
        let actions: Vec<Value> = delays
            .iter()
            .enumerate()
            .map(|(i, d)| relay_action(i as i64 * 10, (i % 16) as i64, "on", *d))
            .collect();
        let (c, _) = catalog(vec![def("m", actions)]);
        let mut r = MacroRunner::new();
        r.start(&c, "m", "p", start).unwrap();
        let mut seen = Vec::new();
        let mut finished = false;
        for _ in 0..1_000 {
            let Some(d) = r.next_deadline_ms() else { break };
            prop_assert!(d >= start);
            for e in r.poll(&c, d, &mut |_| Ok(true)) {
                match e {
                    MacroEffect::Switch { sequence, .. } => seen.push((sequence, d)),
                    MacroEffect::Finished { outcome, .. } => {
                        prop_assert_eq!(outcome, MacroOutcome::Completed);
                        finished = true;
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }
        prop_assert!(finished);
        let mut at = start;
        let want: Vec<(i32, i64)> = delays
            .iter()
            .enumerate()
            .map(|(i, d)| {
                at += d;
                (i as i32 * 10, at)
            })
            .collect();
        prop_assert_eq!(seen, want);
    }
}
