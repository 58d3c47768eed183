//! Rule language, compiler, engine and driver tests. Driver tests run `run_engine` on tokio's
//! paused clock: time only moves when a test advances it (or every task waits on a timer), so
//! hours of rule time take milliseconds.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use jiff::tz::TimeZone;
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::store::{Reading, RuleRecord};

const DEV: &str = "esp32-master-1";
const MAC: &str = "14:33:5C:38:BF:60";
/// 2024-01-01T00:00:00Z, a Monday.
const T0: i64 = 1_704_067_200_000;
const S: i64 = 1000;

fn seed_json() -> Value {
    json!({"conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
           "actions": [{"type": "relay_on", "slave_mac_address": MAC, "relay_number": 0, "duration_seconds": 60}]})
}

fn relay_on() -> Value {
    json!([{"type": "relay_on", "slave_mac_address": MAC, "relay_number": 0, "duration_seconds": 60}])
}

fn with_conditions(conditions: Value) -> Value {
    json!({"conditions": conditions, "actions": relay_on()})
}

fn ph_below(v: f64) -> Value {
    json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": v})
}

fn record(rule_id: &str, rule_json: Value) -> RuleRecord {
    RuleRecord {
        id: format!("uuid-{rule_id}"),
        device_id: DEV.to_owned(),
        rule_id: rule_id.to_owned(),
        rule_name: None,
        rule_description: None,
        rule_json: Some(rule_json),
        enabled: true,
        priority: 50,
        cooldown_seconds: 0,
        max_executions_per_hour: 0,
        revision: 1,
        deleted: false,
        changed_at: String::new(),
    }
}

fn reading(sensor: &str, value: f64, at_ms: i64) -> Reading {
    Reading {
        device_id: DEV.to_owned(),
        sensor_key: sensor.to_owned(),
        value,
        unit: None,
        recorded_at_ms: at_ms,
        received_at_ms: None,
    }
}

fn settings() -> EngineSettings {
    EngineSettings {
        stale_after_ms: 600 * S,
        time_zone: TimeZone::UTC,
    }
}

fn engine_with(rules: &[RuleRecord]) -> Engine {
    let mut engine = Engine::new(settings());
    let problems = engine.load(rules, &Catalog::default(), &HashMap::new());
    assert!(problems.is_empty(), "{problems:?}");
    engine
}

/// Loads a new revision of `rule` (the only rule) into a running engine.
fn reload(engine: &mut Engine, rule: &RuleRecord) {
    engine.load(
        std::slice::from_ref(rule),
        &Catalog::default(),
        &HashMap::new(),
    );
}

/// A pH reading of 6.0 taken and evaluated at `at`.
fn ph_six_at(engine: &mut Engine, at: i64) -> Vec<Firing> {
    engine.on_reading(&reading("ph", 6.0, at), at)
}

fn reason(rule_json: Option<Value>, catalog: &Catalog) -> String {
    let mut r = record("bad", Value::Null);
    r.rule_json = rule_json;
    compile(&r, catalog).map(|_| ()).unwrap_err().to_string()
}

// ---- language and compiler ----

#[test]
fn seed_rule_parses_unchanged_and_compiles() {
    let parsed: RuleJson = serde_json::from_value(seed_json()).unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), seed_json());
    let rule = compile(&record("seed", seed_json()), &Catalog::default()).unwrap();
    assert_eq!(rule.sensors.iter().collect::<Vec<_>>(), ["ph"]);
    assert_eq!(rule.rule_name, "seed");
}

#[test]
fn every_condition_and_action_type_round_trips() {
    let json = json!({
        "conditions": {"type": "all", "held_for_seconds": 10, "conditions": [
            {"type": "sensor_compare", "sensor": "ph", "operator": "<=", "value": 6.5, "hysteresis": 0.2, "held_for_seconds": 30},
            {"type": "sensors_compare", "sensor": "t_in", "operator": ">", "other_sensor": "t_out", "offset": 2.0, "held_for_seconds": 5},
            {"type": "any", "conditions": [
                {"type": "not", "condition": {"type": "sensor_compare", "sensor": "ec", "operator": "==", "value": 1.0}},
                {"type": "sensor_compare", "sensor": "ec", "operator": "!=", "value": 2.0},
                {"type": "sensor_compare", "sensor": "ec", "operator": ">=", "value": 3.0}]},
            {"type": "time_window", "from": "22:00", "to": "06:00", "days": ["mon", "sun"]},
            {"type": "schedule", "cron": "0 */5 * * * *"}]},
        "actions": [
            {"type": "relay_on", "slave_mac_address": MAC, "relay_number": 3, "duration_seconds": 0},
            {"type": "relay_off", "slave_mac_address": "aa:bb:cc:dd:ee:ff", "relay_number": 15},
            {"type": "macro", "macro_id": "m1"},
            {"type": "mqtt_publish", "topic": "autocore/alert", "payload": {"x": 1}, "retain": true}]
    });
    let parsed: RuleJson = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), json);
    let catalog = Catalog {
        macros: HashSet::from(["m1".to_owned()]),
        ..Catalog::default()
    };
    let rule = compile(&record("all", json), &catalog).unwrap();
    assert_eq!(rule.sensors.len(), 4);
    // Defaults: offset 0, duration 0, retain false.
    let minimal = json!({"conditions": {"type": "sensors_compare", "sensor": "a", "operator": "<", "other_sensor": "b"},
        "actions": [{"type": "relay_on", "slave_mac_address": MAC, "relay_number": 1},
                    {"type": "mqtt_publish", "topic": "t", "payload": null}]});
    let parsed: RuleJson = serde_json::from_value(minimal).unwrap();
    assert!(matches!(parsed.conditions, Condition::SensorsCompare { offset, .. } if offset == 0.0));
    assert!(matches!(
        parsed.actions[0],
        Action::RelayOn {
            duration_seconds: 0,
            ..
        }
    ));
    assert!(matches!(
        parsed.actions[1],
        Action::MqttPublish { retain: false, .. }
    ));
}

#[test]
fn every_bad_input_names_its_reason_and_place() {
    let catalog = Catalog {
        relay_counts: HashMap::from([((DEV.to_owned(), MAC.to_owned()), 4)]),
        macros: HashSet::from(["known".to_owned()]),
    };
    let relay = |n: u8| json!({"conditions": ph_below(6.5), "actions": [{"type": "relay_off", "slave_mac_address": MAC, "relay_number": n}]});
    let mut deep = ph_below(6.5);
    for _ in 0..8 {
        deep = json!({"type": "not", "condition": deep});
    }
    let cases: Vec<(Option<Value>, &str)> = vec![
        (None, "rule_json is null"),
        (Some(Value::Null), "rule_json is null"),
        (
            Some(json!([1])),
            "expected an object, found an array at rule_json",
        ),
        (
            Some(with_conditions(
                json!({"type": "all", "conditions": [ph_below(6.5), {"type": "foo"}]}),
            )),
            "unknown condition type \"foo\" at conditions.conditions[1]",
        ),
        (
            Some(with_conditions(
                json!({"type": "sensor_compare", "sensor": "ph", "operator": "=<", "value": 6.5}),
            )),
            "operator \"=<\" not one of < <= > >= == != at conditions",
        ),
        (
            Some(relay(7)),
            "relay 7 but slave 14:33:5C:38:BF:60 has 4 relays at actions[0]",
        ),
        (
            Some(with_conditions(
                json!({"type": "sensor_compare", "operator": "<", "value": 6.5}),
            )),
            "missing field `sensor` at conditions",
        ),
        (
            Some(
                json!({"conditions": ph_below(6.5), "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF", "relay_number": 0}]}),
            ),
            "bad MAC address \"14:33:5C:38:BF\" at actions[0]",
        ),
        (
            Some(
                json!({"conditions": ph_below(6.5), "actions": [{"type": "macro", "macro_id": "nope"}]}),
            ),
            "unknown macro \"nope\" at actions[0]",
        ),
        (
            Some(with_conditions(
                json!({"type": "schedule", "cron": "61 * * * *"}),
            )),
            "cron \"61 * * * *\" does not parse at conditions",
        ),
        (
            Some(with_conditions(json!({"type": "any", "conditions": []}))),
            "empty any at conditions",
        ),
        (
            Some(with_conditions(
                json!({"type": "all", "conditions": [{"type": "all", "conditions": []}]}),
            )),
            "empty all at conditions.conditions[0]",
        ),
        (
            Some(with_conditions(
                json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": null}),
            )),
            "invalid type: null, expected f64 at conditions",
        ),
        (
            Some(with_conditions(
                json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "hysteresis": -0.1}),
            )),
            "hysteresis -0.1 is negative at conditions",
        ),
        (
            Some(with_conditions(deep)),
            "nesting deeper than 8 at conditions.condition.condition.condition.condition.condition.condition.condition.condition",
        ),
        (
            Some(with_conditions(
                json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "colour": 1}),
            )),
            "unknown field `colour`",
        ),
        (
            Some(json!({"conditions": ph_below(6.5), "actions": []})),
            "0 actions at actions; 1 to 32 allowed",
        ),
        (
            Some(json!({"conditions": ph_below(6.5), "actions": [{"type": "dance"}]})),
            "unknown action type \"dance\" at actions[0]",
        ),
        (
            Some(with_conditions(
                json!({"type": "time_window", "from": "25:00", "to": "06:00"}),
            )),
            "time \"25:00\" is not HH:MM at conditions",
        ),
        (
            Some(json!({"conditions": ph_below(6.5), "actions": relay_on(), "extra": 1})),
            "unknown field `extra`",
        ),
        (
            Some(json!({"actions": relay_on()})),
            "missing field `conditions` at rule_json",
        ),
        (
            Some(with_conditions(
                json!({"type": "sensor_compare", "sensor": " ", "operator": "<", "value": 1}),
            )),
            "empty sensor at conditions",
        ),
        (
            Some(
                json!({"conditions": ph_below(6.5), "actions": [{"type": "mqtt_publish", "topic": "a/#", "payload": 1}]}),
            ),
            "wildcard at actions[0]",
        ),
        (
            Some(
                json!({"conditions": ph_below(6.5), "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF:60", "relay_number": 0, "duration_seconds": 86401}]}),
            ),
            "duration_seconds 86401 out of 0..86400 at actions[0]",
        ),
    ];
    for (input, want) in cases {
        let got = reason(input.clone(), &catalog);
        assert!(
            got.contains(want),
            "for {input:?}\n  got  {got}\n  want {want}"
        );
    }
    // 4 relays known: relay 3 is fine; an unknown slave allows 0..=15.
    assert!(compile(&record("ok", relay(3)), &catalog).is_ok());
    assert!(compile(&record("ok", relay(15)), &Catalog::default()).is_ok());
    assert!(compile(&record("no", relay(16)), &Catalog::default()).is_err());
}

fn arb_json() -> impl Strategy<Value = Value> {
    let words = prop::sample::select(vec![
        "type",
        "conditions",
        "condition",
        "actions",
        "sensor",
        "operator",
        "value",
        "other_sensor",
        "offset",
        "hysteresis",
        "held_for_seconds",
        "from",
        "to",
        "days",
        "cron",
        "slave_mac_address",
        "relay_number",
        "duration_seconds",
        "macro_id",
        "topic",
        "payload",
        "retain",
        "sensor_compare",
        "sensors_compare",
        "all",
        "any",
        "not",
        "time_window",
        "schedule",
        "relay_on",
        "relay_off",
        "macro",
        "mqtt_publish",
        "<",
        "=<",
        "mon",
        "08:00",
        "24:61",
        "*/5 * * * *",
        "0 0 31 2 *",
        "L W # ?",
        MAC,
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<f64>().prop_map(|f| json!(f)),
        any::<i64>().prop_map(|i| json!(i)),
        (0u32..40).prop_map(|i| json!(i)),
        "[ -~]{0,12}".prop_map(Value::String),
        words.clone().prop_map(|w| Value::String(w.to_owned())),
    ];
    leaf.prop_recursive(12, 96, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(words.clone().prop_map(str::to_owned), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_json_never_panics_compile(v in arb_json(), c in arb_json(), a in arb_json()) {
        let catalog = Catalog::default();
        let mut r = record("p", v);
        let _ = compile(&r, &catalog);
        r.rule_json = Some(json!({"conditions": c, "actions": a}));
        let _ = compile(&r, &catalog);
    }

    #[test]
    fn arbitrary_cron_text_never_panics(text in "[0-9*/,LW#? A-Z-]{0,24}", after in any::<i32>()) {
        if let Ok(schedule) = cron::CronSchedule::parse(&text) {
            let _ = schedule.next_after(i64::from(after) * 1000, &TimeZone::UTC);
        }
    }
}

prop_compose! {
    fn arb_state()(
        last in proptest::option::of(any::<i64>()),
        recent in prop::collection::vec(any::<i64>(), 0..4),
        held in any::<i64>(),
        sched in any::<i64>(),
        armed in any::<bool>(),
    ) -> RuleState {
        let mut s = RuleState::fresh(1);
        s.last_fired_ms = last;
        s.recent_firings_ms = recent;
        for path in ["conditions", "conditions.conditions[0]", "conditions.conditions[1]"] {
            s.held_since_ms.insert(path.into(), held);
            s.schedule_last_ms.insert(path.into(), sched);
            s.armed.insert(path.into(), armed);
        }
        s
    }
}

proptest! {
    #[test]
    fn restored_state_and_odd_times_never_panic(state in arb_state(), now in any::<i64>(), at in any::<i64>(), v in any::<f64>()) {
        let mut rule = record("r", with_conditions(json!({"type": "all", "held_for_seconds": 5, "conditions": [
            {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "hysteresis": 0.2, "held_for_seconds": 4000000000u32},
            {"type": "schedule", "cron": "* * * * * *"}]})));
        rule.cooldown_seconds = i32::MAX;
        rule.max_executions_per_hour = 2;
        let mut engine = Engine::new(settings());
        engine.load(&[rule], &Catalog::default(), &HashMap::from([("uuid-r".to_owned(), state)]));
        let _ = engine.next_deadline_ms();
        let _ = engine.on_tick(now);
        let _ = engine.on_reading(&reading("ph", v, at), now);
        let _ = engine.next_deadline_ms();
        let _ = engine.take_dirty();
    }
}

// ---- engine ----

#[test]
fn three_valued_logic_fires_only_when_definitely_true() {
    let any = record(
        "any",
        with_conditions(json!({"type": "any", "conditions": [ph_below(6.5),
        {"type": "sensor_compare", "sensor": "ec", "operator": ">", "value": 2.0}]})),
    );
    let all = record(
        "all",
        with_conditions(json!({"type": "all", "conditions": [ph_below(6.5),
        {"type": "sensor_compare", "sensor": "ec", "operator": ">", "value": 2.0}]})),
    );
    let not = record(
        "not",
        with_conditions(json!({"type": "not", "condition":
        {"type": "sensor_compare", "sensor": "ec", "operator": ">", "value": 2.0}})),
    );
    let mut engine = engine_with(&[any, all, not]);
    let fired = |f: Vec<Firing>| f.into_iter().map(|f| f.rule_id).collect::<Vec<_>>();
    // ph true, ec unknown: any fires; all and not(unknown) do not.
    assert_eq!(fired(ph_six_at(&mut engine, T0)), ["any"]);
    // ec false: all false, not true.
    assert_eq!(
        fired(engine.on_reading(&reading("ec", 1.0, T0 + S), T0 + S)),
        ["any", "not"]
    );
    // ec true: all true.
    assert_eq!(
        fired(engine.on_reading(&reading("ec", 3.0, T0 + 2 * S), T0 + 2 * S)),
        ["all", "any"]
    );
}

#[test]
fn firing_carries_rule_fields_readings_and_explanation() {
    let mut rule = record(
        "warm",
        with_conditions(
            json!({"type": "sensors_compare", "sensor": "t_in", "operator": ">",
        "other_sensor": "t_out", "offset": 2.0}),
        ),
    );
    rule.rule_name = Some("Vent when warm".into());
    rule.max_executions_per_hour = 10;
    rule.cooldown_seconds = 5;
    let mut engine = engine_with(&[rule]);
    assert!(
        engine.on_reading(&reading("t_in", 25.0, T0), T0).is_empty(),
        "t_out unknown"
    );
    assert!(
        engine
            .on_reading(&reading("t_out", 23.5, T0), T0)
            .is_empty(),
        "25 > 25.5 is false"
    );
    let f = engine.on_reading(&reading("t_out", 21.0, T0 + S), T0 + S);
    assert_eq!(f.len(), 1);
    let f = &f[0];
    assert_eq!(
        (f.rule.as_str(), f.rule_name.as_str(), f.device_id.as_str()),
        ("uuid-warm", "Vent when warm", DEV)
    );
    assert_eq!(
        (
            f.hourly_count,
            f.hourly_max,
            f.cooldown_seconds,
            f.fired_at_ms
        ),
        (1, 10, 5, T0 + S)
    );
    assert_eq!(f.explanation, "t_in 25 > t_out 21 + 2; 1/10 this hour");
    assert_eq!(f.readings.len(), 2);
    assert_eq!(
        f.actions,
        serde_json::from_value::<Vec<Action>>(relay_on()).unwrap()
    );
    // Cooldown 5 s: not at +4 s, again at +6 s, counting 2/10.
    assert!(
        engine
            .on_reading(&reading("t_in", 25.0, T0 + 5 * S), T0 + 5 * S)
            .is_empty()
    );
    let again = engine.on_reading(&reading("t_in", 25.0, T0 + 6 * S), T0 + 6 * S);
    assert_eq!(
        again.first().map(|f| f.explanation.as_str()),
        Some("t_in 25 > t_out 21 + 2; 2/10 this hour")
    );
}

#[test]
fn stale_and_future_readings() {
    let mut engine = engine_with(&[record("seed", seed_json())]);
    // Recorded 601 s ago with stale_after 600 s: unknown.
    assert!(
        engine
            .on_reading(&reading("ph", 6.0, T0 - 601 * S), T0)
            .is_empty()
    );
    // A reading from the future counts as now, and the explanation shows the values.
    let f = engine.on_reading(&reading("ph", 6.31, T0 + 3600 * S), T0);
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0].readings,
        vec![FiringReading {
            sensor: "ph".into(),
            value: 6.31,
            recorded_at_ms: T0
        }]
    );
    assert_eq!(f[0].explanation, "ph 6.31 < 6.5; 1 this hour");
    // A late, older reading changes nothing.
    assert!(
        engine
            .on_reading(&reading("ph", 6.0, T0 - S), T0 + S)
            .is_empty()
    );
}

#[test]
fn index_evaluates_only_rules_that_read_the_sensor() {
    let ec = |id: &str| {
        record(
            id,
            with_conditions(
                json!({"type": "sensor_compare", "sensor": "ec", "operator": ">", "value": 2.0}),
            ),
        )
    };
    let mut other = record("other-device", seed_json());
    other.device_id = "esp32-master-2".into();
    let mut engine = engine_with(&[
        record("ph1", seed_json()),
        record("ph2", seed_json()),
        ec("ec1"),
        ec("ec2"),
        ec("ec3"),
        other,
    ]);
    engine.on_reading(&reading("ph", 7.0, T0), T0);
    assert_eq!(engine.evaluations(), 2);
    engine.on_reading(&reading("ec", 1.0, T0), T0);
    assert_eq!(engine.evaluations(), 5);
    engine.on_reading(&reading("unused", 1.0, T0), T0);
    assert_eq!(engine.evaluations(), 5);
    assert_eq!(engine.on_tick(T0 + 3600 * S), vec![]);
    assert_eq!(engine.evaluations(), 5);
    assert_eq!(engine.next_deadline_ms(), None);
}

#[test]
fn firings_come_in_priority_order_then_rule_id() {
    let mut low = record("c-low", seed_json());
    low.priority = 10;
    let mut b = record("b", seed_json());
    b.priority = 90;
    let mut a = record("a", seed_json());
    a.priority = 90;
    let mut engine = engine_with(&[low, b, a]);
    let order: Vec<_> = ph_six_at(&mut engine, T0)
        .into_iter()
        .map(|f| (f.priority, f.rule_id))
        .collect();
    assert_eq!(
        order,
        [(90, "a".into()), (90, "b".into()), (10, "c-low".into())]
    );
}

#[test]
fn blocked_engine_remembers_readings_but_fires_nothing() {
    let held = record(
        "held",
        with_conditions(
            json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "held_for_seconds": 10}),
        ),
    );
    let mut engine = engine_with(&[record("seed", seed_json()), held]);
    engine.take_dirty();
    engine.set_blocked(true, T0);
    assert!(ph_six_at(&mut engine, T0).is_empty());
    assert!(engine.on_tick(T0 + 20 * S).is_empty());
    assert!(
        engine.take_dirty().is_empty(),
        "no timer may start while blocked"
    );
    assert_eq!(engine.next_deadline_ms(), None);
    engine.set_blocked(false, T0 + 20 * S);
    // The remembered reading is used; the held-for timer starts only now.
    let f = engine.on_tick(T0 + 20 * S);
    assert!(f.is_empty());
    let f = engine.on_reading(&reading("ec", 1.0, T0 + 21 * S), T0 + 21 * S);
    assert!(f.is_empty());
    let f = engine.on_reading(&reading("ph", 6.1, T0 + 21 * S), T0 + 21 * S);
    assert_eq!(
        f.iter().map(|f| f.rule_id.as_str()).collect::<Vec<_>>(),
        ["seed"]
    );
    assert_eq!(engine.next_deadline_ms(), Some(T0 + 31 * S));
}

#[test]
fn reload_keeps_state_of_unchanged_revision_and_reports_problems() {
    let mut rule = record("seed", seed_json());
    rule.cooldown_seconds = 600;
    let mut engine = engine_with(std::slice::from_ref(&rule));
    assert_eq!(ph_six_at(&mut engine, T0).len(), 1);
    let dirty = engine.take_dirty();
    assert_eq!(dirty.len(), 1);
    assert_eq!(dirty[0].1.last_fired_ms, Some(T0));

    let broken = record("broken", with_conditions(json!({"type": "foo"})));
    let problems = engine.load(
        &[rule.clone(), broken],
        &Catalog::default(),
        &HashMap::new(),
    );
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].rule_id, "broken");
    assert_eq!(
        problems[0].reason,
        "unknown condition type \"foo\" at conditions"
    );
    assert!(
        ph_six_at(&mut engine, T0 + S).is_empty(),
        "still in cooldown"
    );

    rule.revision = 2;
    engine.load(&[rule], &Catalog::default(), &HashMap::new());
    assert!(
        ph_six_at(&mut engine, T0 + 2 * S).is_empty(),
        "a new revision keeps the cooldown"
    );
    assert_eq!(engine.state("uuid-seed").map(|s| s.revision), Some(2));
}

/// The reported case: cooldown 600 s, at most 2 an hour; a rename and two threshold edits
/// within seconds of a firing made it fire 4 times in 13 s, each "1/2 this hour".
#[test]
fn an_edit_keeps_the_cooldown_and_the_hourly_count_of_the_relay() {
    let mut rule = record("seed", seed_json());
    rule.cooldown_seconds = 600;
    rule.max_executions_per_hour = 2;
    let mut engine = engine_with(std::slice::from_ref(&rule));
    let fired = ph_six_at(&mut engine, T0);
    assert_eq!(fired[0].explanation, "ph 6 < 6.5; 1/2 this hour");

    let mut at = T0;
    let edits: [(&str, Value); 3] = [
        ("rename", seed_json()),
        ("threshold 6.6", with_conditions(ph_below(6.6))),
        ("threshold 6.7", with_conditions(ph_below(6.7))),
    ];
    for (revision, (what, json)) in (2..).zip(edits) {
        rule.revision = revision;
        rule.rule_name = Some(format!("after {what}"));
        rule.rule_json = Some(json);
        reload(&mut engine, &rule);
        at += 4 * S;
        assert!(
            ph_six_at(&mut engine, at).is_empty(),
            "{what} reset the cooldown"
        );
    }
    // The cooldown runs from the firing, whatever was edited since.
    let fired = ph_six_at(&mut engine, T0 + 600 * S);
    assert_eq!(fired[0].explanation, "ph 6 < 6.7; 2/2 this hour");
    // A new limit applies to the same history: still 2 in this hour.
    rule.revision += 1;
    rule.cooldown_seconds = 1;
    reload(&mut engine, &rule);
    assert!(
        ph_six_at(&mut engine, T0 + 1_200 * S).is_empty(),
        "at most 2 in any sliding hour"
    );
    assert_eq!(
        ph_six_at(&mut engine, T0 + 3_600 * S).len(),
        1,
        "the first firing left the hour"
    );
}

#[test]
fn an_edit_of_the_cooldown_itself_applies_from_the_last_firing() {
    let mut rule = record("seed", seed_json());
    rule.cooldown_seconds = 600;
    let mut engine = engine_with(std::slice::from_ref(&rule));
    assert_eq!(ph_six_at(&mut engine, T0).len(), 1);
    rule.revision = 2;
    rule.cooldown_seconds = 10;
    reload(&mut engine, &rule);
    assert!(ph_six_at(&mut engine, T0 + 9 * S).is_empty());
    assert_eq!(ph_six_at(&mut engine, T0 + 10 * S).len(), 1);
}

#[test]
fn an_edit_after_a_restart_keeps_the_history_and_unchanged_conditions_keep_their_timers() {
    let held = with_conditions(
        json!({"type": "sensor_compare", "sensor": "ph", "operator": "<",
        "value": 6.5, "held_for_seconds": 30}),
    );
    let mut rule = record("held", held.clone());
    rule.cooldown_seconds = 600;
    let mut engine = engine_with(std::slice::from_ref(&rule));
    assert!(ph_six_at(&mut engine, T0).is_empty());
    assert_eq!(engine.on_tick(T0 + 30 * S).len(), 1);
    assert!(ph_six_at(&mut engine, T0 + 31 * S).is_empty());
    let saved: HashMap<String, RuleState> = engine.take_dirty().into_iter().collect();

    // Restarted with a renamed revision: cooldown from the saved firing, held-for timer kept.
    rule.revision = 2;
    rule.rule_name = Some("renamed".into());
    let mut restarted = Engine::new(settings());
    restarted.load(std::slice::from_ref(&rule), &Catalog::default(), &saved);
    let state = restarted.state("uuid-held").unwrap();
    assert_eq!(state.last_fired_ms, Some(T0 + 30 * S));
    assert_eq!(
        state.held_since_ms.values().copied().collect::<Vec<_>>(),
        [T0 + 30 * S],
        "the hold restarted at its firing"
    );

    // Changed conditions: the history stays, the timers of the old conditions go.
    rule.revision = 3;
    rule.rule_json = Some(with_conditions(
        json!({"type": "sensor_compare", "sensor": "ph",
        "operator": "<", "value": 6.4, "held_for_seconds": 30}),
    ));
    restarted.load(
        std::slice::from_ref(&rule),
        &Catalog::default(),
        &HashMap::new(),
    );
    let state = restarted.state("uuid-held").unwrap();
    assert_eq!(state.last_fired_ms, Some(T0 + 30 * S));
    assert!(state.held_since_ms.is_empty());
}

#[test]
fn disabled_and_deleted_rules_do_not_run() {
    let mut disabled = record("disabled", seed_json());
    disabled.enabled = false;
    let mut deleted = record("deleted", seed_json());
    deleted.deleted = true;
    let mut engine = engine_with(&[disabled, deleted]);
    assert!(ph_six_at(&mut engine, T0).is_empty());
}

#[test]
fn rule_state_round_trips_through_json() {
    let mut state = RuleState::fresh(3);
    state.last_fired_ms = Some(T0);
    state.held_since_ms.insert("conditions".into(), T0);
    state.armed.insert("conditions.conditions[0]".into(), false);
    let text = serde_json::to_string(&state).unwrap();
    assert_eq!(serde_json::from_str::<RuleState>(&text).unwrap(), state);
    assert_eq!(
        serde_json::from_str::<RuleState>("{}").unwrap(),
        RuleState::default()
    );
}

// ---- contradictions ----

fn relay_rule(id: &str, conditions: Value, on: bool, relay: u8) -> RuleRecord {
    let ty = if on { "relay_on" } else { "relay_off" };
    record(
        id,
        json!({"conditions": conditions, "actions": [{"type": ty, "slave_mac_address": MAC, "relay_number": relay}]}),
    )
}

fn ph(op: &str, v: f64) -> Value {
    json!({"type": "sensor_compare", "sensor": "ph", "operator": op, "value": v})
}

#[test]
fn contradictions_flag_overlapping_on_off_pairs_only() {
    let on = relay_rule("dose-on", ph("<", 6.5), true, 0);
    let flagged = |other: RuleRecord| {
        let mut engine = Engine::new(settings());
        engine.load(&[on.clone(), other], &Catalog::default(), &HashMap::new());
        engine.contradictions().to_vec()
    };
    assert!(flagged(relay_rule("off-high", ph(">", 7.0), false, 0)).is_empty());
    assert!(flagged(relay_rule("off-at", ph(">=", 6.5), false, 0)).is_empty());
    assert!(flagged(relay_rule("off-other-relay", ph("<", 6.0), false, 1)).is_empty());
    assert!(
        flagged(relay_rule(
            "off-not",
            json!({"type": "not", "condition": ph("<", 6.5)}),
            false,
            0
        ))
        .is_empty()
    );
    assert!(flagged(relay_rule("off-all", json!({"type": "all", "conditions": [ph(">", 7.0), {"type": "schedule", "cron": "0 * * * *"}]}), false, 0)).is_empty());

    let c = flagged(relay_rule("off-low", ph("<", 7.0), false, 0));
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].a.as_str(), c[0].b.as_str(), c[0].relay_number),
        ("dose-on", "off-low", 0)
    );
    assert_eq!(c[0].slave_mac_address, MAC);
    assert!(c[0].reason.contains("ph < 6.5"), "{}", c[0].reason);
    // Undecidable conditions count as overlapping.
    assert_eq!(
        flagged(relay_rule(
            "off-cron",
            json!({"type": "schedule", "cron": "0 * * * *"}),
            false,
            0
        ))
        .len(),
        1
    );
    assert_eq!(
        flagged(relay_rule(
            "off-any",
            json!({"type": "any", "conditions": [ph(">", 7.0)]}),
            false,
            0
        ))
        .len(),
        1
    );
}

// ---- replay ----

#[test]
fn replay_applies_cooldown_and_fires_held_for_between_readings() {
    let mut rule = record("seed", seed_json());
    rule.cooldown_seconds = 60;
    let readings = (0..300).step_by(10).map(|t| reading("ph", 6.0, T0 + t * S));
    let times: Vec<i64> = replay(&rule, &Catalog::default(), &settings(), readings)
        .unwrap()
        .iter()
        .map(|f| (f.fired_at_ms - T0) / S)
        .collect();
    assert_eq!(times, [0, 60, 120, 180, 240]);

    let held = record(
        "held",
        with_conditions(
            json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "held_for_seconds": 45}),
        ),
    );
    let readings = [
        reading("ph", 6.0, T0 + 100 * S),
        reading("ph", 6.0, T0),
        reading("ph", 6.0, T0 + 200 * S),
    ];
    let fired = replay(&held, &Catalog::default(), &settings(), readings).unwrap();
    assert_eq!(
        fired.iter().map(|f| f.fired_at_ms - T0).collect::<Vec<_>>(),
        [45 * S, 100 * S, 200 * S]
    );
    assert!(
        fired[0].explanation.starts_with("ph 6 < 6.5 held 45 s"),
        "{}",
        fired[0].explanation
    );

    assert!(
        replay(
            &record("bad", Value::Null),
            &Catalog::default(),
            &settings(),
            []
        )
        .is_err()
    );
}

// ---- driver on tokio's paused clock ----
//
// `start_paused`: tokio's clock stands still until a test calls `tokio::time::advance`, or
// until every task waits on a timer, when the runtime jumps to the earliest one
// (auto-advance). The real `run_engine` runs on `Clock::starting_at` a fixed Unix time, so
// hours of rule time take milliseconds and nothing sleeps for real.

struct Driver {
    input: mpsc::Sender<EngineInput>,
    output: mpsc::Receiver<EngineOutput>,
    clock: Clock,
}

impl Driver {
    /// Spawns `run_engine`; call inside a paused runtime, where `start_ms` is now.
    fn start(engine: Engine, start_ms: i64) -> Driver {
        let clock = Clock::starting_at(start_ms);
        let (input, input_rx) = mpsc::channel(16);
        let (output_tx, output) = mpsc::channel(100_000);
        tokio::spawn(run_engine(engine, clock.clone(), input_rx, output_tx));
        Driver {
            input,
            output,
            clock,
        }
    }

    fn with_rules(rules: Vec<RuleRecord>, tz: TimeZone, start_ms: i64) -> Driver {
        let engine = Engine::new(EngineSettings {
            stale_after_ms: 600 * S,
            time_zone: tz,
        });
        let d = Driver::start(engine, start_ms);
        d.input
            .try_send(EngineInput::Rules {
                rules,
                catalog: Catalog::default(),
            })
            .unwrap();
        d
    }

    /// Lets the engine task run until it waits again (yielding never moves the paused clock).
    async fn settle() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    async fn send(&self, input: EngineInput) {
        self.input.send(input).await.unwrap();
        Self::settle().await;
    }

    async fn ph(&self, value: f64) {
        self.send(EngineInput::Reading(reading(
            "ph",
            value,
            self.clock.now_ms(),
        )))
        .await;
    }

    /// `tokio::time::advance` one second at a time, so the engine wakes at each second a
    /// timer is due and sees the time it was due at.
    async fn advance_secs(&self, secs: u64) {
        Self::settle().await;
        for _ in 0..secs {
            tokio::time::advance(Duration::from_secs(1)).await;
            Self::settle().await;
        }
    }

    /// Sleeps on the paused clock: with every task waiting, tokio jumps from one timer to the
    /// next (the engine's deadlines, then this sleep's end).
    async fn wait_secs(&self, secs: u64) {
        Self::settle().await;
        tokio::time::sleep(Duration::from_secs(secs)).await;
        Self::settle().await;
    }

    fn outputs(&mut self) -> Vec<EngineOutput> {
        std::iter::from_fn(|| self.output.try_recv().ok()).collect()
    }

    fn firings(&mut self) -> Vec<Firing> {
        self.outputs()
            .into_iter()
            .filter_map(|o| match o {
                EngineOutput::Fired(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    /// Firing times in seconds since `since_ms`.
    fn fired_secs(&mut self, since_ms: i64) -> Vec<i64> {
        self.firings()
            .iter()
            .map(|f| (f.fired_at_ms - since_ms) / S)
            .collect()
    }

    /// (rule_id, seconds since `since_ms`) of each firing.
    fn fired_rules(&mut self, since_ms: i64) -> Vec<(String, i64)> {
        self.firings()
            .into_iter()
            .map(|f| (f.rule_id, (f.fired_at_ms - since_ms) / S))
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn driver_cooldown_fires_every_60_s_while_true() {
    let mut rule = record("seed", seed_json());
    rule.cooldown_seconds = 60;
    let mut h = Driver::with_rules(vec![rule], TimeZone::UTC, T0);
    Driver::settle().await;
    for _ in 0..=300 {
        h.ph(6.0).await;
        h.advance_secs(1).await;
    }
    assert_eq!(h.fired_secs(T0), [0, 60, 120, 180, 240, 300]);
}

#[tokio::test(start_paused = true)]
async fn driver_emits_state_after_its_firing_and_problems_on_load() {
    let mut h = Driver::with_rules(
        vec![record("seed", seed_json()), record("bad", Value::Null)],
        TimeZone::UTC,
        T0,
    );
    Driver::settle().await;
    h.ph(6.0).await;
    let kinds: Vec<&str> = h
        .outputs()
        .iter()
        .map(|o| match o {
            EngineOutput::Problems(p) if p.len() == 1 && p[0].reason == "rule_json is null" => {
                "problems"
            }
            EngineOutput::Problems(_) => "wrong problems",
            EngineOutput::Contradictions(_) => "contradictions",
            EngineOutput::State(_) => "state",
            EngineOutput::Fired(_) => "fired",
        })
        .collect();
    assert_eq!(
        kinds,
        ["problems", "contradictions", "state", "fired", "state"]
    );
}

#[tokio::test(start_paused = true)]
async fn driver_hourly_limit_is_a_sliding_hour() {
    let mut rule = record("seed", seed_json());
    rule.max_executions_per_hour = 3;
    let mut h = Driver::with_rules(vec![rule], TimeZone::UTC, T0);
    Driver::settle().await;
    for _ in 0..=(2 * 360) {
        h.ph(6.0).await;
        h.advance_secs(10).await;
    }
    let fired = h.fired_secs(T0);
    assert_eq!(fired, [0, 10, 20, 3600, 3610, 3620, 7200]);
}

#[tokio::test(start_paused = true)]
async fn driver_held_for_fires_from_the_timer_and_resets_on_false() {
    let rule = record(
        "held",
        with_conditions(
            json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "held_for_seconds": 30}),
        ),
    );
    let mut h = Driver::with_rules(vec![rule], TimeZone::UTC, T0);
    Driver::settle().await;
    h.ph(6.0).await; // t=0 starts the timer
    h.advance_secs(10).await;
    h.ph(6.0).await;
    h.advance_secs(15).await;
    h.ph(7.0).await; // t=25 resets it
    h.advance_secs(5).await;
    h.ph(6.0).await; // t=30 starts again
    h.wait_secs(40).await; // no more readings: the timer fires at t=60
    let fired = h.firings();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].fired_at_ms, T0 + 60 * S);
    assert_eq!(fired[0].explanation, "ph 6 < 6.5 held 30 s; 1 this hour");
}

#[tokio::test(start_paused = true)]
async fn driver_held_for_resets_when_its_reading_goes_stale() {
    let rule = record(
        "held",
        with_conditions(
            json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "held_for_seconds": 900}),
        ),
    );
    let mut h = Driver::with_rules(vec![rule], TimeZone::UTC, T0);
    Driver::settle().await;
    h.ph(6.0).await; // stale at 601 s
    h.wait_secs(700).await;
    h.ph(6.0).await; // restarts the timer at 700
    h.wait_secs(950).await;
    assert_eq!(
        h.fired_secs(T0),
        Vec::<i64>::new(),
        "the reading from t=700 is stale before 1600"
    );
}

#[tokio::test(start_paused = true)]
async fn driver_hysteresis_needs_the_value_to_pass_back() {
    let rule = record(
        "hyst",
        with_conditions(
            json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "hysteresis": 0.2}),
        ),
    );
    let mut h = Driver::with_rules(vec![rule], TimeZone::UTC, T0);
    Driver::settle().await;
    // Tenths: down 6.8->6.0, wobble up to 6.6 and down (no re-arm), up to 6.8, down to 6.0.
    let mut ramp: Vec<i32> = (60..=68).rev().collect();
    ramp.extend(61..=66);
    ramp.extend((60..=65).rev());
    ramp.extend(61..=68);
    ramp.extend((60..=67).rev());
    for tenths in &ramp {
        h.ph(f64::from(*tenths) / 10.0).await;
        h.advance_secs(1).await;
    }
    let fired = h.fired_secs(T0);
    assert_eq!(fired.len(), 2, "{fired:?}");
    // Both at a 6.4 on the way down.
    for t in fired {
        assert_eq!(ramp[usize::try_from(t).unwrap()], 64);
    }
}

#[tokio::test(start_paused = true)]
async fn driver_schedule_fires_at_each_occurrence() {
    let six = record(
        "six",
        json!({"conditions": {"type": "schedule", "cron": "0 */5 * * * *"}, "actions": relay_on()}),
    );
    let five = record(
        "five",
        json!({"conditions": {"type": "schedule", "cron": "*/10 * * * *"}, "actions": relay_on()}),
    );
    let wall = std::time::Instant::now();
    let mut h = Driver::with_rules(vec![six, five], TimeZone::UTC, T0 + 30 * S);
    h.wait_secs(20 * 60).await;
    // Twenty minutes of rule time, no real sleeping.
    assert!(
        wall.elapsed() < Duration::from_secs(10),
        "{:?}",
        wall.elapsed()
    );
    let fired = h.fired_rules(T0);
    let at = |id: &str| {
        fired
            .iter()
            .filter(|(r, _)| r == id)
            .map(|(_, t)| *t)
            .collect::<Vec<_>>()
    };
    assert_eq!(at("six"), [300, 600, 900, 1200]);
    assert_eq!(at("five"), [600, 1200]);
}

#[tokio::test(start_paused = true)]
async fn driver_time_window_in_a_fixed_zone() {
    // 08:00-08:10 at UTC+2 is 06:00-06:10 UTC.
    let rule = record(
        "window",
        with_conditions(json!({"type": "all", "conditions": [ph_below(6.5),
        {"type": "time_window", "from": "08:00", "to": "08:10", "days": ["mon"]}]})),
    );
    let open = T0 + 6 * 3600 * S;
    let mut h = Driver::with_rules(
        vec![rule],
        TimeZone::fixed(jiff::tz::offset(2)),
        open - 5 * 60 * S - 30 * S,
    );
    Driver::settle().await;
    for _ in 0..20 {
        h.ph(6.0).await;
        h.wait_secs(60).await;
    }
    let fired = h.fired_secs(open);
    // The tick at 08:00:00 fires with the 07:59:30 reading; then each reading until 08:10.
    assert_eq!(fired.first(), Some(&0));
    assert_eq!(fired.len(), 11, "{fired:?}");
    assert!(fired.iter().all(|t| (0..600).contains(t)), "{fired:?}");
}

#[tokio::test(start_paused = true)]
async fn driver_stale_readings_never_fire() {
    let mut h = Driver::with_rules(vec![record("seed", seed_json())], TimeZone::UTC, T0);
    Driver::settle().await;
    for _ in 0..10 {
        let old = h.clock.now_ms() - 601 * S;
        h.send(EngineInput::Reading(reading("ph", 6.0, old))).await;
        h.advance_secs(1).await;
    }
    assert_eq!(h.fired_secs(T0), Vec::<i64>::new());
}

#[tokio::test(start_paused = true)]
async fn driver_blocked_fires_nothing_until_unblocked() {
    let mut h = Driver::with_rules(vec![record("seed", seed_json())], TimeZone::UTC, T0);
    h.send(EngineInput::Blocked(true)).await;
    h.ph(6.0).await;
    h.advance_secs(5).await;
    h.send(EngineInput::Blocked(false)).await;
    h.ph(6.0).await;
    assert_eq!(h.fired_secs(T0), [5]);
}

#[tokio::test(start_paused = true)]
async fn driver_restored_state_keeps_cooldown_and_held_for() {
    let mut cool = record("cool", seed_json());
    cool.cooldown_seconds = 60;
    let held = record(
        "held",
        with_conditions(
            json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "held_for_seconds": 30}),
        ),
    );
    let mut cool_state = RuleState::fresh(1);
    cool_state.last_fired_ms = Some(T0 - 30 * S);
    cool_state.recent_firings_ms = vec![T0 - 30 * S];
    let mut held_state = RuleState::fresh(1);
    held_state
        .held_since_ms
        .insert("conditions".into(), T0 - 20 * S);
    let states = HashMap::from([
        ("uuid-cool".to_owned(), cool_state),
        ("uuid-held".to_owned(), held_state),
    ]);
    let mut engine = Engine::new(settings());
    assert!(
        engine
            .load(&[cool, held], &Catalog::default(), &states)
            .is_empty()
    );
    assert!(
        engine.take_dirty().is_empty(),
        "restored states are not dirty"
    );

    let mut h = Driver::start(engine, T0);
    h.ph(6.0).await;
    h.wait_secs(40).await;
    let fired = h.fired_rules(T0);
    // held: 20 s before restart + 10 s after. cool: 30 s left of its cooldown, but only
    // readings drive it and there is one, at t=0.
    assert_eq!(fired, [("held".to_owned(), 10)]);
    // Past its cooldown, cool fires again; held is still held.
    h.ph(6.0).await;
    assert_eq!(h.fired_secs(T0), [40, 40]);
}

#[test]
fn composite_explanation_names_the_deciding_conditions_and_false_rules_stay_clean() {
    let mut engine = engine_with(&[record(
        "mix",
        with_conditions(json!({"type": "all", "conditions": [
            ph_below(6.5),
            {"type": "any", "conditions": [
                {"type": "sensor_compare", "sensor": "temp", "operator": ">", "value": 30.0},
                {"type": "not", "condition":
                    {"type": "sensor_compare", "sensor": "ec", "operator": ">", "value": 2.0}},
                {"type": "sensor_compare", "sensor": "level", "operator": "<", "value": 1.0}
            ]}
        ]})),
    )]);
    engine.take_dirty();
    // Unknown and false evaluations leave the state unchanged: nothing to persist.
    assert!(ph_six_at(&mut engine, T0).is_empty());
    assert!(engine.on_reading(&reading("temp", 25.0, T0), T0).is_empty());
    assert!(engine.take_dirty().is_empty());
    let f = engine.on_reading(&reading("ec", 1.0, T0 + S), T0 + S);
    assert_eq!(f.len(), 1);
    // All is true: every child; Any is true: its true children only ("level" is unknown).
    assert_eq!(
        f[0].explanation,
        "ph 6 < 6.5 and not (ec 1 > 2); 1 this hour"
    );
    let sensors: Vec<&str> = f[0].readings.iter().map(|r| r.sensor.as_str()).collect();
    assert_eq!(sensors, ["ph", "ec"]);
    assert_eq!(engine.take_dirty().len(), 1);
    assert!(engine.take_dirty().is_empty());
}

fn every_30_s() -> RuleRecord {
    record(
        "every30",
        json!({"conditions": {"type": "schedule", "cron": "*/30 * * * * *"}, "actions": relay_on()}),
    )
}

/// The agent restarted `down_s` after it last evaluated at T0: the occurrences it missed.
fn after_outage(down_s: i64) -> Vec<Firing> {
    let rule = every_30_s();
    let mut before = engine_with(std::slice::from_ref(&rule));
    assert!(before.on_tick(T0 + S).is_empty(), "baseline");
    let saved: HashMap<String, RuleState> = before.take_dirty().into_iter().collect();
    let mut after = Engine::new(settings());
    after.load(std::slice::from_ref(&rule), &Catalog::default(), &saved);
    after.on_tick(T0 + S + down_s * S)
}

#[test]
fn after_an_outage_the_latest_occurrence_within_the_grace_runs_once() {
    // Down 102 s: occurrences 30 s, 60 s and 90 s were missed, 72 s, 42 s and 12 s late;
    // the last two are within the 60 s grace and run once between them.
    assert_eq!(after_outage(102).len(), 1);
    // Down 70 s: 30 s and 60 s missed, 41 s and 11 s late.
    assert_eq!(after_outage(70).len(), 1);
    assert_eq!(after_outage(8).len(), 0, "no occurrence in 8 s from t=1");
    assert_eq!(after_outage(40).len(), 1);
}

#[test]
fn occurrences_all_missed_by_more_than_the_grace_are_skipped_not_run_late() {
    let rule = record(
        "hourly",
        json!({"conditions": {"type": "schedule", "cron": "0 0 * * * *"}, "actions": relay_on()}),
    );
    let mut engine = engine_with(std::slice::from_ref(&rule));
    assert!(engine.on_tick(T0 + S).is_empty());
    // Back at 02:05: 01:00 and 02:00 were missed by over a minute.
    assert!(engine.on_tick(T0 + 2 * 3_600 * S + 300 * S).is_empty());
    assert_eq!(engine.on_tick(T0 + 3 * 3_600 * S).len(), 1, "03:00 runs");
}

#[tokio::test(start_paused = true)]
async fn driver_schedule_never_runs_an_occurrence_twice_when_the_clock_is_set_back() {
    let mut h = Driver::with_rules(vec![every_30_s()], TimeZone::UTC, T0 + S);
    h.wait_secs(100).await;
    assert_eq!(h.fired_secs(T0), [30, 60, 90]);
    // The wall clock is set back an hour: the hour's occurrences already ran.
    h.clock.jump(-3_600 * S);
    h.wait_secs(3_590).await;
    assert!(h.fired_secs(T0).is_empty(), "an occurrence ran twice");
    // Past where it was, it goes on as before.
    h.wait_secs(30).await;
    assert_eq!(h.fired_secs(T0), [120]);
}

#[tokio::test(start_paused = true)]
async fn driver_schedule_runs_once_for_a_clock_set_forward_then_keeps_its_pace() {
    let mut h = Driver::with_rules(vec![every_30_s()], TimeZone::UTC, T0 + S);
    h.wait_secs(40).await;
    assert_eq!(h.fired_secs(T0), [30]);
    // Set forward an hour (NTP after a boot without a battery clock): the skipped hour's
    // occurrences are not run late; the one within the grace runs once, at the engine's next
    // wake-up (at most a minute later).
    h.clock.jump(3_600 * S);
    h.wait_secs(60).await;
    // Jumped at t=41 to 3641; the engine slept until its 60 s deadline, now 3660.
    assert_eq!(h.fired_secs(T0), [3_660, 3_690]);
    h.wait_secs(60).await;
    assert_eq!(h.fired_secs(T0), [3_720, 3_750], "every 30 s again");
}

#[test]
fn on_a_reset_a_running_hold_starts_again_and_occurrences_of_the_stop_are_not_run() {
    let held = record(
        "held",
        with_conditions(
            json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "held_for_seconds": 30}),
        ),
    );
    let mut engine = engine_with(&[held, every_30_s()]);
    assert!(engine.on_tick(T0 + S).is_empty(), "schedule baseline");
    assert!(ph_six_at(&mut engine, T0 + 2 * S).is_empty());
    // Stopped at 10 s with 22 s of the hold left and the 30 s occurrence to come.
    engine.set_blocked(true, T0 + 10 * S);
    assert!(engine.on_tick(T0 + 45 * S).is_empty());
    engine.set_blocked(false, T0 + 50 * S);
    assert!(
        engine.on_tick(T0 + 50 * S).is_empty(),
        "nothing fires in the instant of the reset"
    );
    // The hold counts from the reset; the schedule's next occurrence is at 60 s.
    assert_eq!(
        engine
            .on_tick(T0 + 60 * S)
            .iter()
            .map(|f| f.rule_id.as_str())
            .collect::<Vec<_>>(),
        ["every30"]
    );
    assert!(engine.on_tick(T0 + 79 * S).is_empty());
    assert_eq!(
        engine.on_tick(T0 + 80 * S).len(),
        1,
        "held 30 s from the reset"
    );
}

#[test]
fn a_held_for_rule_with_no_cooldown_fires_once_per_hold() {
    let held = record(
        "held",
        with_conditions(
            json!({"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "held_for_seconds": 10}),
        ),
    );
    let mut engine = engine_with(&[held]);
    assert!(ph_six_at(&mut engine, T0).is_empty());
    assert_eq!(engine.on_tick(T0 + 10 * S).len(), 1);
    assert!(
        ph_six_at(&mut engine, T0 + 10 * S + 12).is_empty(),
        "fired again 12 ms later"
    );
    assert_eq!(
        engine.on_tick(T0 + 20 * S).len(),
        1,
        "after another full hold"
    );
}

#[test]
fn replay_judges_staleness_by_arrival_as_the_live_engine_did() {
    let settings = EngineSettings {
        stale_after_ms: 5 * S,
        time_zone: TimeZone::UTC,
    };
    // Published with a timestamp 10 s old: stale on arrival, so live never fired on it.
    let late = Reading {
        received_at_ms: Some(T0 + 10 * S),
        ..reading("ph", 6.0, T0)
    };
    let mut live = Engine::new(settings.clone());
    live.load(
        &[record("seed", seed_json())],
        &Catalog::default(),
        &HashMap::new(),
    );
    assert!(live.on_reading(&late, T0 + 10 * S).is_empty());
    let replayed = replay(
        &record("seed", seed_json()),
        &Catalog::default(),
        &settings,
        [late.clone()],
    )
    .unwrap();
    assert!(
        replayed.is_empty(),
        "replay fired on a reading live saw stale"
    );
    // One that arrived in time fires in both.
    let fresh = Reading {
        received_at_ms: Some(T0 + 2 * S),
        ..reading("ph", 6.0, T0 + S)
    };
    let replayed = replay(
        &record("seed", seed_json()),
        &Catalog::default(),
        &settings,
        [late, fresh],
    )
    .unwrap();
    assert_eq!(
        replayed.iter().map(|f| f.fired_at_ms).collect::<Vec<_>>(),
        [T0 + 2 * S]
    );
}
