//! The cloud side for dashboard builders: a rule the agent could not compile is refused by the
//! database with every problem and its path (what supabase-js shows as `error.message`); the
//! agent's compiler and the database judge schemas/rule_cases.json alike; a relay change arrives
//! in the supabase_realtime publication with its old and new row, as Realtime reads it.

use std::collections::{BTreeMap, HashSet};

use autocore_agent::rules::{Catalog, compile};
use autocore_agent::store::RuleRecord;
use autocore_stack::{Claims, repo_root};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{ALICE, MASTER, SLAVE, World};

#[tokio::test]
async fn a_dashboard_saving_an_invalid_rule_gets_every_problem_with_its_path() {
    let world = World::start();
    let alice = world.caller(&Claims::user(ALICE));
    // The rule of issue 16, as a dashboard posts it with supabase-js (`.from('decision_rules').insert`).
    let (status, body) = alice
        .send(
            Method::POST,
            "/decision_rules",
            Some(json!({
                "device_id": MASTER, "rule_id": "RULE_BOGUS", "rule_name": "bogus",
                "rule_json": {
                    "conditions": {"type": "all", "conditions": [
                        {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
                        {"type": "bogus"}]},
                    "actions": [
                        {"type": "relay_on", "slave_mac_address": "not-a-mac", "relay_number": 99, "duration_seconds": -10},
                        {"type": "explode"}]
                }
            })),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "23514", "{body}");
    assert_eq!(
        body["message"],
        "decision_rules_rule_json_invalid: unknown condition type \"bogus\" at conditions.conditions[1]; \
         duration_seconds -10 out of 0..86400 at actions[0]; relay_number 99 out of 0..15 at actions[0]; \
         MAC \"not-a-mac\" is not upper-case XX:XX:XX:XX:XX:XX at actions[0]; \
         unknown action type \"explode\" at actions[1]",
        "{body}"
    );
    assert!(
        body["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("rule_json_problems"),
        "{body}"
    );
    assert_eq!(
        world.sql_one("select count(*) from decision_rules where rule_id = 'RULE_BOGUS'"),
        "0",
        "nothing was stored"
    );

    // The same check without saving, for an editor that validates as the user types.
    let (status, problems) = alice
        .rpc(
            "rule_json_problems",
            json!({"rule": {"conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "=<", "value": 6.5},
                            "actions": [{"type": "relay_off", "slave_mac_address": SLAVE, "relay_number": 16}]}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{problems}");
    assert_eq!(
        problems,
        json!([
            "operator \"=<\" not one of < <= > >= == != at conditions",
            "relay_number 16 out of 0..15 at actions[0]"
        ])
    );

    // A valid rule (the seed's) is stored as before.
    let (status, body) = alice
        .send(
            Method::POST,
            "/decision_rules",
            Some(json!({
                "device_id": MASTER, "rule_id": "RULE_001", "rule_name": "Ajustar pH quando baixo",
                "rule_json": {
                    "conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
                    "actions": [{"type": "relay_on", "slave_mac_address": SLAVE, "relay_number": 0, "duration_seconds": 60}]
                }
            })),
            Some("return=minimal"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Every case of schemas/rule_cases.json through the agent's `compile` (fed the rule as the
/// database hands it back, i.e. after jsonb's normalisation) and `public.rule_json_problems`.
#[test]
fn the_agent_and_the_database_judge_every_rule_case_alike() {
    let text = std::fs::read_to_string(repo_root().join("schemas/rule_cases.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 40,
        "expected the case list, found {}",
        cases.len()
    );
    let catalog = Catalog {
        macros: doc["macros"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_owned())
            .collect::<HashSet<_>>(),
        ..Catalog::default()
    };

    let world = World::start();
    assert!(!text.contains("$cases$"));
    let judged: Value = serde_json::from_str(&world.sql_one(&format!(
        "select jsonb_agg(jsonb_build_object('name', c ->> 'name', 'stored', (c -> 'rule_json')::text,
                'problems', to_jsonb(public.rule_json_problems(c -> 'rule_json'))) order by n)
           from jsonb_array_elements($cases${text}$cases$::jsonb -> 'cases') with ordinality as t(c, n)"
    )))
    .unwrap();

    let mut wrong = Vec::new();
    let mut names = HashSet::new();
    for (case, db) in cases.iter().zip(judged.as_array().unwrap()) {
        let name = case["name"].as_str().unwrap();
        assert!(names.insert(name), "case name {name:?} is used twice");
        let (want_agent, want_db) = (&case["agent"], &case["database"]);
        if want_agent != want_db {
            assert!(
                case["why"].as_str().is_some_and(|w| !w.is_empty()),
                "{name}: the validators may differ only with a reason (\"why\")"
            );
        }
        let stored: Value = serde_json::from_str(db["stored"].as_str().unwrap()).unwrap();
        let record = RuleRecord {
            id: "00000000-0000-0000-0000-000000000000".into(),
            device_id: MASTER.into(),
            rule_id: "CASE".into(),
            rule_name: None,
            rule_description: None,
            rule_json: Some(stored),
            enabled: true,
            priority: 50,
            cooldown_seconds: 60,
            max_executions_per_hour: 10,
            revision: 1,
            deleted: false,
            changed_at: String::new(),
        };
        let agent = match compile(&record, &catalog) {
            Ok(_) => "accept".to_owned(),
            Err(e) => format!("refuse ({e})"),
        };
        let problems = db["problems"].as_array().unwrap();
        let database = if problems.is_empty() {
            "accept".to_owned()
        } else {
            format!("refuse ({})", Value::Array(problems.clone()))
        };
        if !agent.starts_with(want_agent.as_str().unwrap())
            || !database.starts_with(want_db.as_str().unwrap())
        {
            wrong.push(format!(
                "{name}: agent {agent}, expected {want_agent}; database {database}, expected {want_db}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_relay_change_arrives_in_the_supabase_realtime_feed_with_its_old_and_new_row() {
    let world = World::start();
    world.sql(&format!(
        "insert into relay_slaves (master_device_id, slave_mac_address, relay_count, relay_states)
         values ('{MASTER}', '{SLAVE}', 4, '{{f,f,f,f}}')"
    ));
    // pgoutput is what Supabase Realtime decodes the WAL with; the slot reads it the same way.
    world.sql("select pg_create_logical_replication_slot('cloud_side', 'pgoutput')");
    world.sql(&format!(
        "update relay_slaves set relay_states = '{{t,f,f,f}}', is_online = true where slave_mac_address = '{SLAVE}'"
    ));
    // Not in the publication: telemetry (a firehose) and the rules. Committed synchronously (the
    // harness runs with synchronous_commit off), so that all of the WAL above is flushed and
    // decodable.
    world.sql(&format!(
        "set synchronous_commit = on;
         insert into telemetry_data (device_id, sensor_key, value, recorded_at) values ('{MASTER}', 'ph', 6.4, now());
         update decision_rules set enabled = enabled"
    ));
    let messages: Vec<Vec<u8>> = world
        .sql(
            "select encode(data, 'hex') from pg_logical_slot_get_binary_changes('cloud_side', null, null,
               'proto_version', '1', 'publication_names', 'supabase_realtime')",
        )
        .iter()
        .map(|h| hex::decode(h).unwrap())
        .collect();
    world.sql("select pg_drop_replication_slot('cloud_side')");

    let mut relations: BTreeMap<u32, (String, u8, Vec<String>)> = BTreeMap::new();
    let mut updates = Vec::new();
    for m in &messages {
        let mut r = Reader(m, 0);
        match r.u8() {
            b'R' => {
                let id = r.u32();
                let name = format!("{}.{}", r.cstr(), r.cstr());
                let identity = r.u8();
                let columns = (0..r.u16())
                    .map(|_| {
                        r.u8();
                        let c = r.cstr();
                        r.u32();
                        r.u32();
                        c
                    })
                    .collect();
                relations.insert(id, (name, identity, columns));
            }
            b'U' => {
                let id = r.u32();
                let mut old = None;
                let mut kind = r.u8();
                if kind == b'O' || kind == b'K' {
                    old = Some((kind, r.tuple()));
                    kind = r.u8();
                }
                assert_eq!(kind, b'N');
                updates.push((id, old, r.tuple()));
            }
            _ => {}
        }
    }
    let names: Vec<&str> = relations.values().map(|(n, ..)| n.as_str()).collect();
    assert_eq!(
        names,
        ["public.relay_slaves"],
        "only the published table's changes arrive"
    );
    let (id, (_, identity, columns)) = relations.iter().next().unwrap();
    assert_eq!(*identity, b'f', "replica identity full");
    let column = |tuple: &[Option<String>], name: &str| {
        let i = columns.iter().position(|c| c == name).unwrap();
        tuple[i].clone()
    };
    assert_eq!(updates.len(), 1, "one update");
    let (update_id, old, new) = &updates[0];
    assert_eq!(update_id, id);
    let (old_kind, old) = old.as_ref().expect("the old row comes with the update");
    assert_eq!(*old_kind, b'O', "the whole old row, not only its key");
    assert_eq!(column(old, "relay_states").as_deref(), Some("{f,f,f,f}"));
    assert_eq!(column(old, "is_online").as_deref(), Some("f"));
    assert_eq!(column(new, "relay_states").as_deref(), Some("{t,f,f,f}"));
    assert_eq!(column(new, "is_online").as_deref(), Some("t"));
    assert_eq!(column(new, "master_device_id").as_deref(), Some(MASTER));
}

/// A pgoutput (protocol 1) message being read.
struct Reader<'a>(&'a [u8], usize);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.0[self.1..self.1 + n];
        self.1 += n;
        s
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().unwrap())
    }
    fn cstr(&mut self) -> String {
        let end = self.0[self.1..].iter().position(|b| *b == 0).unwrap();
        let s = String::from_utf8_lossy(self.take(end)).into_owned();
        self.1 += 1;
        s
    }
    /// TupleData: each column null ('n'), an unchanged TOAST value ('u') or text ('t').
    fn tuple(&mut self) -> Vec<Option<String>> {
        (0..self.u16())
            .map(|_| match self.u8() {
                b't' => {
                    let n = self.u32() as usize;
                    Some(String::from_utf8_lossy(self.take(n)).into_owned())
                }
                _ => None,
            })
            .collect()
    }
}
