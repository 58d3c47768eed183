//! The edge functions (`edge-functions/`) on the real stack: Deno serving `/functions/v1/NAME`
//! in front of the local PostgREST, called with real signed JWTs. Each refusal is checked for
//! its reason and for what it did not store.

use autocore_stack::{Claims, EdgeFunctions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{ALICE, BOB, MASTER, SLAVE, World};

/// The world with MASTER's slave known to the cloud (4 relays) and the functions in front.
fn world_with_functions() -> (World, EdgeFunctions) {
    let world = World::start();
    world.sql(&format!(
        "insert into relay_slaves (master_device_id, slave_mac_address, relay_count) values ('{MASTER}', '{SLAVE}', 4)"
    ));
    let functions =
        EdgeFunctions::start(&world.stack.rest_url().unwrap()).expect("Deno serves the functions");
    (world, functions)
}

/// One function as one caller (or none).
struct Function {
    url: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Function {
    fn new(
        world: &World,
        functions: &EdgeFunctions,
        name: &str,
        claims: Option<&Claims>,
    ) -> Function {
        Function {
            url: format!("{}/{name}", functions.url()),
            token: claims.map(|c| world.stack.token(c)),
            http: reqwest::Client::new(),
        }
    }

    fn with_token(mut self, token: &str) -> Function {
        self.token = Some(token.to_string());
        self
    }

    async fn raw(&self, method: Method, body: String) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, &self.url)
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.expect("the function answers");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn call(&self, method: Method, body: Value) -> (StatusCode, Value) {
        self.raw(method, body.to_string()).await
    }

    async fn post(&self, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, body).await
    }
}

/// The `{path, message}` problems of a 422, as (path, message) pairs.
fn problems(body: &Value) -> Vec<(String, String)> {
    body["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems in {body}"))
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_string(),
                p["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn paths(body: &Value) -> Vec<String> {
    problems(body).into_iter().map(|(p, _)| p).collect()
}

fn seed_rule_json() -> Value {
    json!({
        "conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
        "actions": [{"type": "relay_on", "slave_mac_address": SLAVE, "relay_number": 0, "duration_seconds": 60}]
    })
}

#[tokio::test]
async fn rules_are_checked_against_the_schema_the_database_and_the_device_before_they_are_stored() {
    let (world, functions) = world_with_functions();
    let alice = Function::new(&world, &functions, "rules", Some(&Claims::user(ALICE)));

    // No token, the anon key, a token PostgREST does not accept: 401, nothing read.
    for (function, error) in [
        (Function::new(&world, &functions, "rules", None), "no_token"),
        (
            Function::new(&world, &functions, "rules", Some(&Claims::anon())),
            "not_signed_in",
        ),
        (
            Function::new(&world, &functions, "rules", None)
                .with_token(&Claims::user(ALICE).sign("not-the-backend-secret-not-the-backend")),
            "token_refused",
        ),
    ] {
        let (status, body) = function.post(json!({"device_id": MASTER})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"], error, "{body}");
    }
    // A body that is not JSON, or not an object: 400.
    let (status, body) = alice.raw(Method::POST, "{not json".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "malformed_json", "{body}");
    let (status, body) = alice.post(json!([1, 2])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Bounded: a body over 64 KiB is refused, never kept; only POST and PATCH (and a browser's
    // preflight) are answered.
    let (status, body) = alice
        .post(json!({"device_id": MASTER, "rule_name": "x".repeat(70_000)}))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let (status, body) = alice.raw(Method::GET, String::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    let preflight = reqwest::Client::new()
        .request(Method::OPTIONS, &alice.url)
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");

    // Every problem at once, each at its path: the schema's, the database's (a blank sensor
    // name, which no JSON Schema keyword says), and the device's (relay 9 on a 4-relay slave, a
    // slave the device does not have).
    let (status, body) = alice
        .post(json!({
            "device_id": MASTER, "rule_id": "RULE_BAD", "rule_name": "bad", "priority": 500,
            "rule_json": {
                "conditions": {"type": "all", "conditions": [
                    {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
                    {"type": "bogus"},
                    {"type": "sensor_compare", "sensor": " ", "operator": "<", "value": 1}]},
                "actions": [
                    {"type": "relay_on", "slave_mac_address": "not-a-mac", "relay_number": 99, "duration_seconds": -10},
                    {"type": "explode"},
                    {"type": "relay_on", "slave_mac_address": SLAVE, "relay_number": 9},
                    {"type": "relay_off", "slave_mac_address": "AA:BB:CC:DD:EE:FF", "relay_number": 0}]
            }
        }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "invalid_request", "{body}");
    assert_eq!(
        paths(&body),
        [
            "priority",
            "rule_json.actions[0].duration_seconds",
            "rule_json.actions[0].relay_number",
            "rule_json.actions[0].slave_mac_address",
            "rule_json.actions[1].type",
            "rule_json.actions[2].relay_number",
            "rule_json.actions[3].slave_mac_address",
            "rule_json.conditions.conditions[1].type",
            "rule_json.conditions.conditions[2]",
        ],
        "{body}"
    );
    let by_path = |path: &str| {
        problems(&body)
            .into_iter()
            .find(|(p, _)| p == path)
            .map(|(_, m)| m)
            .unwrap()
    };
    assert_eq!(by_path("priority"), "must be <= 100, found 500");
    assert_eq!(
        by_path("rule_json.actions[0].relay_number"),
        "must be <= 15, found 99"
    );
    assert!(
        by_path("rule_json.actions[1].type")
            .starts_with("unknown type \"explode\"; one of relay_on")
    );
    assert_eq!(
        by_path("rule_json.actions[2].relay_number"),
        format!("relay 9 does not exist on slave {SLAVE}, which has 4 relays (0..3)")
    );
    assert_eq!(
        by_path("rule_json.actions[3].slave_mac_address"),
        format!(
            "slave AA:BB:CC:DD:EE:FF is not a known slave of device {MASTER} (known: {SLAVE} (4 relays))"
        )
    );
    assert_eq!(
        by_path("rule_json.conditions.conditions[2]"),
        "empty sensor"
    );
    assert_eq!(
        world.sql_one("select count(*) from decision_rules"),
        "0",
        "nothing was stored"
    );

    // A good rule is stored, and the dashboard sees it through PostgREST.
    let (status, body) = alice
        .post(json!({"device_id": MASTER, "rule_id": "RULE_001", "rule_name": "pH low", "rule_json": seed_rule_json()}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["rule"]["id"]
        .as_str()
        .expect("the stored row")
        .to_string();
    assert_eq!(body["rule"]["revision"], 1, "{body}");
    let (status, rows) = world
        .caller(&Claims::user(ALICE))
        .get(&format!(
            "/decision_rules?id=eq.{id}&select=rule_id,rule_json"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        rows,
        json!([{"rule_id": "RULE_001", "rule_json": seed_rule_json()}])
    );

    // The same rule_id again: 409, by name.
    let (status, body) = alice
        .post(json!({"device_id": MASTER, "rule_id": "RULE_001", "rule_name": "again", "rule_json": seed_rule_json()}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "rule_exists", "{body}");

    // An update naming a relay the slave lacks is refused and changes nothing; a good one lands.
    let mut four = seed_rule_json();
    four["actions"][0]["relay_number"] = json!(4);
    let (status, body) = alice
        .call(
            Method::PATCH,
            json!({"id": id, "rule_json": four, "enabled": false}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        paths(&body),
        ["rule_json.actions[0].relay_number"],
        "{body}"
    );
    assert_eq!(
        world.sql_one(&format!(
            "select enabled || ' ' || revision from decision_rules where id = '{id}'"
        )),
        "true 1"
    );
    let mut three = seed_rule_json();
    three["actions"][0]["relay_number"] = json!(3);
    let (status, body) = alice
        .call(
            Method::PATCH,
            json!({"id": id, "rule_json": three, "enabled": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rule"]["revision"], 2, "{body}");
    assert_eq!(
        world.sql_one(&format!(
            "select enabled || ' ' || (rule_json #>> '{{actions,0,relay_number}}') from decision_rules where id = '{id}'"
        )),
        "false 3"
    );

    // Another owner's device, or rule, looks like none at all.
    let bob = Function::new(&world, &functions, "rules", Some(&Claims::user(BOB)));
    let (status, body) = bob
        .post(json!({"device_id": MASTER, "rule_id": "RULE_BOB", "rule_name": "bob's", "rule_json": seed_rule_json()}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "unknown_device", "{body}");
    let (status, body) = bob
        .call(Method::PATCH, json!({"id": id, "enabled": true}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(world.sql_one("select count(*) from decision_rules"), "1");
    assert_eq!(
        world.sql_one(&format!(
            "select enabled from decision_rules where id = '{id}'"
        )),
        "f"
    );
}

#[tokio::test]
async fn commands_are_refused_with_the_reason_and_a_good_one_is_queued() {
    let (world, functions) = world_with_functions();
    let alice = Function::new(&world, &functions, "commands", Some(&Claims::user(ALICE)));
    let command = |relays: Value, actions: Value, durations: Value| {
        json!({"master_device_id": MASTER, "slave_mac_address": SLAVE,
               "relay_numbers": relays, "actions": actions, "duration_seconds": durations})
    };
    let count = || world.sql_one("select count(*) from relay_commands_slave");

    // More than 5 relays.
    let (status, body) = alice
        .post(command(
            json!([0, 1, 2, 3, 4, 5]),
            json!(vec!["on"; 6]),
            json!(vec![10; 6]),
        ))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let found = problems(&body);
    assert!(
        found
            .iter()
            .any(|(p, m)| p == "relay_numbers" && m.contains("more than 5")),
        "{body}"
    );
    // Relays the slave does not have (it has 4), each by its index.
    let (status, body) = alice
        .post(command(
            json!([1, 4, 7]),
            json!(["on", "on", "off"]),
            json!([10, 10, 0]),
        ))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        paths(&body),
        ["relay_numbers[1]", "relay_numbers[2]"],
        "{body}"
    );
    assert_eq!(
        problems(&body)[0].1,
        format!("relay 4 does not exist on slave {SLAVE}, which has 4 relays (0..3)")
    );
    // A slave the master does not have.
    let mut unknown_slave = command(json!([0]), json!(["on"]), json!([10]));
    unknown_slave["slave_mac_address"] = json!("AA:BB:CC:DD:EE:FF");
    let (status, body) = alice.post(unknown_slave).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(paths(&body), ["slave_mac_address"], "{body}");
    // Expiry out of range, both ways, and arrays of different lengths.
    for expires in [1, 7 * 24 * 3600 + 1] {
        let mut late = command(json!([0]), json!(["on"]), json!([10]));
        late["expires_in_seconds"] = json!(expires);
        let (status, body) = alice.post(late).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(paths(&body), ["expires_in_seconds"], "{body}");
    }
    let (status, body) = alice
        .post(command(json!([0, 1]), json!(["on"]), json!([10, 10])))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(paths(&body), ["actions"], "{body}");
    // Another owner's master looks like none.
    let bob = Function::new(&world, &functions, "commands", Some(&Claims::user(BOB)));
    let (status, body) = bob
        .post(command(json!([0]), json!(["on"]), json!([10])))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "unknown_device", "{body}");
    assert_eq!(count(), "0", "no refused command was stored");

    // A good one is queued, pending, with the expiry asked for.
    let mut good = command(json!([0, 3]), json!(["on", "off"]), json!([30, 0]));
    good["expires_in_seconds"] = json!(60);
    good["priority"] = json!(40);
    good["client_id"] = json!("6d1f3c3e-8a4b-4c2a-9d43-2f1e0b7a5c11");
    let (status, body) = alice.post(good.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // A retry with the same idempotency key queues nothing more.
    let (status, again) = alice.post(good).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["error"], "duplicate_client_id", "{again}");
    let id = body["command"]["id"].as_i64().expect("the stored row");
    assert_eq!(
        world.sql_one(&format!(
            "select status || ' ' || command_type || ' ' || priority || ' ' || relay_numbers::text || ' ' || \
                    (expires_at - created_at between interval '55 seconds' and interval '61 seconds') \
             from relay_commands_slave where id = {id}"
        )),
        "pending manual 40 {0,3} true"
    );

    // While the owner's emergency stop is latched, nothing is sent, and the reason says why.
    world.sql(&format!(
        "insert into system_status (owner_id, emergency_stop, emergency_reason, emergency_changed_at, emergency_changed_by) \
         values ('{ALICE}', true, 'smoke in the greenhouse', now(), 'alice')"
    ));
    let (status, body) = alice
        .post(command(json!([1]), json!(["on"]), json!([10])))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "emergency_stop", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("smoke in the greenhouse"),
        "{body}"
    );
    assert_eq!(count(), "1", "only the good command was stored");
}

#[tokio::test]
async fn anyone_of_the_owner_stops_and_only_the_owner_resets() {
    let (world, functions) = world_with_functions();
    let emergency = |claims: &Claims| Function::new(&world, &functions, "emergency", Some(claims));
    let latched = || {
        world.sql_one(&format!("select coalesce((select emergency_stop::text from system_status where owner_id = '{ALICE}'), 'none')"))
    };
    let agent = emergency(&Claims::agent(ALICE, "pi-alice"));

    // A master's token and a revoked agent's cannot set the latch.
    let (status, body) = emergency(&Claims::master(ALICE, MASTER))
        .post(json!({"action": "stop"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = emergency(&Claims::agent(ALICE, "pi-revoked"))
        .post(json!({"action": "stop"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(latched(), "none");
    // A bad action: 422 at its path.
    let (status, body) = agent.post(json!({"action": "pause"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(paths(&body), ["action"], "{body}");

    // The owner's agent stops the plant, naming one of its devices.
    let (status, body) = agent
        .post(json!({"action": "stop", "device_id": MASTER, "reason": "pump leaking"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["system_status"]["emergency_stop"], true, "{body}");
    assert_eq!(
        world.sql_one(&format!(
            "select emergency_reason || ' / ' || emergency_changed_by from system_status where owner_id = '{ALICE}'"
        )),
        "pump leaking / agent pi-alice (cloud)"
    );

    // The agent may not reset from the cloud; another owner cannot reach this plant at all.
    let (status, body) = agent.post(json!({"action": "reset"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "reset_owner_only", "{body}");
    let bob = emergency(&Claims::user(BOB));
    let (status, body) = bob
        .post(json!({"action": "reset", "device_id": MASTER}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Bob's own reset is Bob's latch, not Alice's.
    let (status, body) = bob.post(json!({"action": "reset"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(latched(), "true", "still stopped");

    // The owner resets it.
    let alice = emergency(&Claims::user(ALICE));
    let (status, body) = alice
        .post(json!({"action": "reset", "device_id": MASTER}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["system_status"]["emergency_stop"], false, "{body}");
    assert_eq!(latched(), "false");
    // And stops it again, as a person.
    let (status, body) = alice.post(json!({"action": "stop"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(latched(), "true");
    assert_eq!(
        world.sql_one(&format!(
            "select emergency_changed_by from system_status where owner_id = '{ALICE}'"
        )),
        format!("user {ALICE} (cloud)")
    );
}

/// The functions type-check, pass `deno lint` and are formatted (`deno fmt --line-width 120`),
/// with the npm imports from tools/deno as edge-functions/deno.lock pins them.
#[test]
fn the_functions_type_check_lint_clean_and_are_formatted() {
    let root = autocore_stack::repo_root();
    let deno = root.join("tools/node_modules/deno/deno");
    let entrypoints = [
        "edge-functions/_dev/serve.ts",
        "edge-functions/rules/index.ts",
        "edge-functions/commands/index.ts",
        "edge-functions/emergency/index.ts",
    ];
    let lock = format!("--lock={}", root.join("edge-functions/deno.lock").display());
    let runs: [Vec<&str>; 3] = [
        [
            vec!["check", "--frozen", lock.as_str()],
            entrypoints.to_vec(),
        ]
        .concat(),
        vec!["lint", "edge-functions"],
        vec![
            "fmt",
            "--check",
            "--line-width",
            "120",
            "edge-functions/_shared",
            "edge-functions/_dev",
            "edge-functions/rules",
            "edge-functions/commands",
            "edge-functions/emergency",
        ],
    ];
    for args in runs {
        let out = std::process::Command::new(&deno)
            .args(&args)
            .current_dir(&root)
            .env("DENO_DIR", root.join("tools/deno"))
            .env("DENO_NO_UPDATE_CHECK", "1")
            .env("NO_COLOR", "1")
            .output()
            .expect("Deno runs (scripts/install-deps installs it)");
        assert!(
            out.status.success(),
            "deno {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every case of schemas/rule_cases.json through the `rules` function (`dry_run`), on a slave
/// with 16 relays: the function refuses exactly the rules the database refuses, so a rule the
/// function passes is never refused on insert, and each problem names a path in `rule_json`.
#[tokio::test]
async fn the_rules_function_judges_every_rule_case_as_the_database_does() {
    let (world, functions) = world_with_functions();
    world.sql(&format!(
        "update relay_slaves set relay_count = 16 where master_device_id = '{MASTER}'"
    ));
    let alice = Function::new(&world, &functions, "rules", Some(&Claims::user(ALICE)));
    let text = std::fs::read_to_string(autocore_stack::repo_root().join("schemas/rule_cases.json"))
        .unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "expected the case list");
    let mut wrong = Vec::new();
    let mut normalised: Vec<String> = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (status, body) = alice
            .post(
                json!({"device_id": MASTER, "rule_id": "CASE", "rule_name": name,
                         "rule_json": case["rule_json"], "dry_run": true}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        let want_valid = case["database"] == "accept";
        let valid = body["valid"] == true;
        if valid != problems(&body).is_empty() {
            wrong.push(format!("{name}: valid and problems disagree: {body}"));
        }
        if valid && !want_valid {
            // 1.0 is 1 to JavaScript: the function stores the rule with 1, which the database
            // accepts. Only a text the function stores unchanged must be refused.
            let (status, stored) = alice
                .post(
                    json!({"device_id": MASTER, "rule_id": format!("CASE_{}", normalised.len()),
                             "rule_name": name, "rule_json": case["rule_json"]}),
                )
                .await;
            if status != StatusCode::CREATED || stored["rule"]["rule_json"] == case["rule_json"] {
                wrong.push(format!(
                    "{name}: function {body}, database {}",
                    case["database"]
                ));
            }
            normalised.push(name.to_string());
        } else if valid != want_valid {
            wrong.push(format!(
                "{name}: function {body}, database {}",
                case["database"]
            ));
        }
        for (path, message) in problems(&body) {
            if !path.starts_with("rule_json") || message.is_empty() {
                wrong.push(format!(
                    "{name}: problem outside rule_json: {path}: {message}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Only whole numbers written with a fraction; the dry runs stored nothing.
    assert_eq!(normalised, ["relay_number 1.0"]);
    assert_eq!(world.sql_one("select count(*) from decision_rules"), "1");
}
