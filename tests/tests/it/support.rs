//! Fixtures for the end-to-end tests: a backend with the pgTAP world loaded, and a PostgREST
//! client that speaks as one caller with a real signed JWT.

use autocore_stack::postgres::DATABASE;
use autocore_stack::{Claims, Stack, StackOptions, repo_root};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

pub const ALICE: Uuid = Uuid::from_u128(0xa0000000_0000_0000_0000_000000000001);
pub const BOB: Uuid = Uuid::from_u128(0xb0000000_0000_0000_0000_000000000002);

/// A running backend (Postgres + PostgREST) with the two-owner world of sql/tests/fixtures.
pub struct World {
    pub stack: Stack,
    http: reqwest::Client,
}

impl World {
    pub fn start() -> World {
        World::start_with(StackOptions::backend_only())
    }

    /// The backend and Mosquitto.
    pub fn start_full() -> World {
        World::start_with(StackOptions::default())
    }

    /// The backend and a Mosquitto with no logins, ACLs or size limit: a broker the agent does
    /// not control, for tests of what the agent survives.
    pub fn start_with_open_broker() -> World {
        World::start_with(StackOptions {
            broker: autocore_stack::Security::Open,
            ..StackOptions::default()
        })
    }

    fn start_with(options: StackOptions) -> World {
        let stack = Stack::start(options).expect("stack starts");
        let world = World {
            stack,
            http: reqwest::Client::new(),
        };
        let fixture = repo_root().join("sql/tests/fixtures/world.sql");
        world
            .stack
            .postgres()
            .unwrap()
            .psql(DATABASE, &["-f", &fixture.display().to_string()])
            .expect("world fixture loads");
        world
    }

    /// Runs SQL as the superuser and returns the rows, one `|`-separated line each.
    pub fn sql(&self, sql: &str) -> Vec<String> {
        let out = self
            .stack
            .postgres()
            .unwrap()
            .psql(DATABASE, &["-t", "-A", "-c", sql])
            .unwrap_or_else(|e| panic!("SQL failed: {sql}\n{e}"));
        out.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    pub fn sql_one(&self, sql: &str) -> String {
        self.sql(sql)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no row from {sql}"))
    }

    pub fn caller(&self, claims: &Claims) -> Rest {
        Rest {
            base: self.stack.rest_url().unwrap(),
            token: Some(self.stack.token(claims)),
            http: self.http.clone(),
        }
    }

    /// A caller with a raw bearer token (or none), for tokens the backend must refuse.
    pub fn caller_with_token(&self, token: Option<String>) -> Rest {
        Rest {
            base: self.stack.rest_url().unwrap(),
            token,
            http: self.http.clone(),
        }
    }
}

/// PostgREST as one caller.
#[derive(Clone)]
pub struct Rest {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Rest {
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        prefer: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(prefer) = prefer {
            req = req.header("Prefer", prefer);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("PostgREST answers");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, None, None).await
    }

    pub async fn rpc(&self, function: &str, args: Value) -> (StatusCode, Value) {
        self.send(Method::POST, &format!("/rpc/{function}"), Some(args), None)
            .await
    }

    /// The values of `field` in a JSON array answer, sorted, as strings.
    pub async fn column(&self, path: &str, field: &str) -> Vec<String> {
        let (status, body) = self.get(path).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        let mut values: Vec<String> = body
            .as_array()
            .unwrap_or_else(|| panic!("GET {path} gave no array: {body}"))
            .iter()
            .map(|row| match &row[field] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        values.sort();
        values
    }
}

/// Polls `probe` every 50 ms until it returns Some, or panics after `timeout` with `what`.
pub async fn eventually<T>(
    what: &str,
    timeout: std::time::Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The world's master that the edge tests drive, and its one slave board.
pub const MASTER: &str = "ESP32_ALICE_1";
pub const SLAVE: &str = "14:33:5C:38:BF:60";

/// The simulator playing MASTER with SLAVE (4 relays, at most an hour on) and a pH sensor at
/// 6.8, on a fast radio, with MASTER's login on the world's broker; tests adjust timing and
/// radio with struct update syntax.
pub fn one_master_sim(world: &World, key_hex: &str) -> firmware_protocol::sim::SimConfig {
    let config = one_master_sim_on(&world.stack.mqtt_url().unwrap(), key_hex);
    world.stack.admit_sim(&config).expect("the master's login");
    config
}

fn one_master_sim_on(mqtt_url: &str, key_hex: &str) -> firmware_protocol::sim::SimConfig {
    use firmware_protocol::message::RelayLimits;
    use firmware_protocol::sim::{
        MasterSpec, MasterTiming, RadioSpec, SensorSource, SensorSpec, SimConfig, SlaveSpec,
    };
    SimConfig {
        mqtt_url: Some(mqtt_url.to_string()),
        masters: vec![MasterSpec {
            id: firmware_protocol::DeviceId::new(MASTER).unwrap(),
            key: firmware_protocol::MasterKey::from_hex(key_hex).unwrap(),
            slaves: vec![SlaveSpec {
                mac: SLAVE.parse().unwrap(),
                relays: vec![
                    RelayLimits {
                        max_on_s: 3600,
                        boot_on: false
                    };
                    4
                ],
            }],
            sensors: vec![SensorSpec {
                name: "ph".into(),
                unit: Some("pH".into()),
                source: SensorSource::Fixed(6.8),
            }],
        }],
        timing: MasterTiming {
            telemetry_interval_ms: 200,
            ..MasterTiming::default()
        },
        radio: RadioSpec {
            loss_percent: 0,
            delay_ms: 1,
        },
        state_dir: None,
        actuation_log_dir: None,
        radio_control: None,
        poll: None,
    }
}

/// Inserts one pending command for `relay` of `slave` (on for `duration_s`) as the dashboard
/// would; returns its id.
pub fn insert_command(
    world: &World,
    master: &str,
    slave: &str,
    relay: u8,
    duration_s: u32,
) -> String {
    world.sql_one(&format!(
        "insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
         values ('{master}', '{slave}', '{{{relay}}}', '{{on}}', '{{{duration_s}}}') returning id"
    ))
}

/// Waits until command `id` has `status` in the cloud.
pub async fn until_status(world: &World, id: &str, status: &str, timeout: std::time::Duration) {
    eventually(&format!("command {id} {status}"), timeout, || {
        (world.sql_one(&format!(
            "select status from relay_commands_slave where id = {id}"
        )) == status)
            .then_some(())
    })
    .await;
}

/// Inserts `n` pending manual commands for `master` with one statement; returns nothing.
pub fn insert_pending_commands(world: &World, master: &str, n: usize) {
    world.sql(&format!(
        "insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, priority, created_at)
         select '{master}', '14:33:5C:38:BF:60', array[g % 8], array['on'], array[60], g % 101, now() - make_interval(secs => g)
           from generate_series(1, {n}) g"
    ));
}

/// Runs a simulator until the returned sender is dropped.
pub fn start_sim(config: firmware_protocol::sim::SimConfig) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = firmware_protocol::sim::run(config, async move {
            let _ = stopped.await;
        })
        .await;
    });
    stop
}

/// An agent serving MASTER for alice (pi-alice), stopped when dropped.
pub struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
    /// The local API's base URL.
    pub api: String,
    pub db: std::path::PathBuf,
    pub config: autocore_agent::config::AgentConfig,
}

/// One `[[masters]]` entry for an agent's configuration.
pub fn master_toml(device_id: &str, key_hex: &str, transport: &str) -> String {
    format!(
        "[[masters]]\ndevice_id = \"{device_id}\"\nkey = \"{key_hex}\"\ntransport = \"{transport}\"\n"
    )
}

/// Starts an agent on the world's stack; `tail_toml` adds sections ([engine], [safety], ...)
/// and ends with its `[[masters]]` (see [`master_toml`]). The agent and its masters get their
/// broker logins first, as `autocore-agent broker-config` would give them.
pub async fn start_agent(world: &World, tail_toml: &str) -> Agent {
    let jwt = world
        .stack
        .token(&autocore_stack::Claims::agent(ALICE, "pi-alice"));
    start_agent_with_jwt(world, &jwt, tail_toml).await
}

/// [`start_agent`] with the JWT `jwt`, for tokens the backend must refuse.
pub async fn start_agent_with_jwt(world: &World, jwt: &str, tail_toml: &str) -> Agent {
    start_agent_with(world, jwt, &agent_mqtt_toml(world, ""), tail_toml).await
}

/// The agent's `[mqtt]` keys on the world's broker with its own login, then `extra` keys.
pub fn agent_mqtt_toml(world: &World, extra: &str) -> String {
    let login = world
        .stack
        .broker_login(autocore_stack::Role::Agent, "pi-alice")
        .expect("the agent's broker login");
    format!(
        "url = \"{}\"\n        username = \"{}\"\n        password = \"{}\"\n        {extra}",
        world.stack.mqtt_url().unwrap(),
        login.username,
        login.password
    )
}

/// [`start_agent`] with the JWT `jwt` and `mqtt_toml` as its `[mqtt]` section's keys (`url`
/// among them), for a broker of the test's own.
pub async fn start_agent_with(world: &World, jwt: &str, mqtt_toml: &str, tail_toml: &str) -> Agent {
    let rest = world.stack.rest_url().unwrap();
    start_agent_on(world, &rest, jwt, mqtt_toml, tail_toml).await
}

/// [`start_agent_with`] on the backend at `rest` (a proxy of the test's in front of PostgREST).
pub async fn start_agent_on(
    world: &World,
    rest: &str,
    jwt: &str,
    mqtt_toml: &str,
    tail_toml: &str,
) -> Agent {
    start_agent_overridden(world, rest, jwt, mqtt_toml, tail_toml, &[]).await
}

/// [`start_agent_on`] with `AUTOCORE_<SECTION>_<KEY>` overrides, as the environment gives them
/// (for keys of the sections the base configuration already has, such as `[store]`).
pub async fn start_agent_overridden(
    world: &World,
    rest: &str,
    jwt: &str,
    mqtt_toml: &str,
    tail_toml: &str,
    overrides: &[(&str, &str)],
) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
        [agent]
        id = "pi-alice"
        [store]
        path = "{db}"
        telemetry_flush_ms = 100
        [cloud]
        rest_url = "{rest}"
        jwt = "{jwt}"
        poll_interval_ms = 200
        [mqtt]
        {mqtt_toml}
        ack_timeout_ms = 2000
        [api]
        listen = "127.0.0.1:0"
        {tail_toml}
        "#,
        db = dir.path().join("agent.db").display(),
    );
    let config = autocore_agent::config::AgentConfig::from_toml(
        &toml,
        std::path::Path::new("test.toml"),
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    if world.stack.mosquitto().is_ok() {
        admit_masters(world, &config);
    }
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_url = format!("http://{}", api.local_addr().unwrap());
    let mut kept = config.clone();
    kept.api.listen = api.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        autocore_agent::run(config, api, async move {
            let _ = stopped.await;
        })
        .await
        .expect("agent runs");
    });
    Agent {
        stop: Some(stop),
        task: Some(task),
        _dir: dir,
        api: api_url,
        db: kept.store.path.clone(),
        config: kept,
    }
}

/// The broker logins of an agent configuration's `[[masters]]`.
pub fn admit_masters(world: &World, config: &autocore_agent::config::AgentConfig) {
    for master in &config.masters {
        world
            .stack
            .broker_master(
                &firmware_protocol::DeviceId::new(master.device_id.as_str()).unwrap(),
                &firmware_protocol::MasterKey::from_hex(master.key.expose()).unwrap(),
            )
            .expect("a master's broker login");
    }
}

impl Agent {
    /// Stops the agent as SIGTERM does and waits for `run` to return: every task ends.
    pub async fn shut_down(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("the agent stops within 10 s of being told to")
            .expect("the agent's task ends without a panic");
    }
}

/// Subscribes to `topic` on the broker with a monitor's `login` and hands every payload that is
/// JSON to `sink`; returns once the broker has acknowledged the subscription.
pub async fn observe_json(
    mqtt_url: &str,
    login: &autocore_stack::Login,
    topic: &str,
    qos: firmware_protocol::sim::rumqttc::QoS,
    mut sink: impl FnMut(Value) + Send + 'static,
) {
    use firmware_protocol::sim::rumqttc::{AsyncClient, Event, Packet};
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(mqtt_url, login), 100);
    client.subscribe(topic, qos).await.unwrap();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _keep = client;
        let mut ready_tx = Some(ready_tx);
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                        sink(v);
                    }
                }
                _ => {}
            }
        }
    });
    let _ = ready.await;
}

/// Client options for `login` (whose username the broker makes the client id).
pub fn mqtt_options(
    mqtt_url: &str,
    login: &autocore_stack::Login,
) -> firmware_protocol::sim::rumqttc::MqttOptions {
    let (host, port) = firmware_protocol::sim::parse_mqtt_url(mqtt_url).unwrap();
    let mut options =
        firmware_protocol::sim::rumqttc::MqttOptions::new(login.username.as_str(), host, port);
    options.set_credentials(login.username.as_str(), login.password.as_str());
    options
}

/// The agent as its own process (`autocore-agent-under-test run --config`), killed when
/// dropped, so a failing test leaves no agent running; tests kill it with -9 to crash it.
pub struct AgentProcess(std::process::Child);

impl AgentProcess {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn spawn_agent(config: &std::path::Path) -> AgentProcess {
    AgentProcess(
        std::process::Command::new(env!("CARGO_BIN_EXE_autocore-agent-under-test"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the agent starts"),
    )
}

/// The value of the first `/metrics` line of the agent at `api` that starts with `line_start`
/// (0 when there is none).
pub async fn metric(api: &str, line_start: &str) -> f64 {
    let text = reqwest::get(format!("{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Given a request's path: the status to answer without forwarding it (the backend is away).
pub type RefuseFault = Box<dyn Fn(&str) -> Option<u16> + Send + Sync>;
/// Given a request's path and the backend's answer: whether to lose the answer and say 504
/// instead (the backend did the work; the caller cannot know, as after a PostgREST freeze).
pub type LoseAnswerFault = Box<dyn Fn(&str, &[u8]) -> bool + Send + Sync>;

/// Given a request's path: how long to hold it before passing it on (a slow backend).
pub type DelayFault = Box<dyn Fn(&str) -> Option<std::time::Duration> + Send + Sync>;

/// What [`faulty_proxy`] does to the requests it passes on; by default, nothing.
pub struct ProxyFaults {
    pub refuse: RefuseFault,
    pub lose_answer: LoseAnswerFault,
    pub delay: DelayFault,
}

impl Default for ProxyFaults {
    fn default() -> ProxyFaults {
        ProxyFaults {
            refuse: Box::new(|_| None),
            lose_answer: Box::new(|_, _| false),
            delay: Box::new(|_| None),
        }
    }
}

/// A proxy in front of PostgREST at `upstream` that injects `faults`; returns its URL.
pub async fn faulty_proxy(upstream: String, faults: ProxyFaults) -> String {
    use axum::body::{Body, to_bytes};
    use axum::http::{Request, Response};
    let client = reqwest::Client::new();
    let faults = std::sync::Arc::new(faults);
    let app = axum::Router::new().fallback(move |request: Request<Body>| {
        let (client, upstream, faults) = (client.clone(), upstream.clone(), faults.clone());
        async move {
            let status = |code: u16| {
                Response::builder()
                    .status(code)
                    .body(Body::empty())
                    .unwrap()
            };
            let (parts, body) = request.into_parts();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            if let Some(code) = (faults.refuse)(&path) {
                return status(code);
            }
            if let Some(pause) = (faults.delay)(&path) {
                tokio::time::sleep(pause).await;
            }
            let body = to_bytes(body, 16 << 20).await.unwrap_or_default();
            let mut forward = client.request(parts.method.clone(), format!("{upstream}{path}"));
            for (name, value) in &parts.headers {
                if name != "host" && name != "content-length" {
                    forward = forward.header(name, value);
                }
            }
            let Ok(answer) = forward.body(body).send().await else {
                return status(502);
            };
            let code = answer.status().as_u16();
            let content_type = answer.headers().get("content-type").cloned();
            let Ok(bytes) = answer.bytes().await else {
                return status(502);
            };
            if (faults.lose_answer)(&path, &bytes) {
                return status(504);
            }
            let mut response = Response::builder().status(code);
            if let Some(content_type) = content_type {
                response = response.header("content-type", content_type);
            }
            response.body(Body::from(bytes)).unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Collects the `ts_ms` of every telemetry payload the master publishes (QoS 1: the observer
/// itself loses none).
pub async fn telemetry_observer(
    world: &World,
) -> std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<i64>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let sink = seen.clone();
    let login = world
        .stack
        .broker_login(autocore_stack::Role::Monitor, "telemetry-observer")
        .unwrap();
    observe_json(
        &world.stack.mqtt_url().unwrap(),
        &login,
        &format!("autocore/devices/{MASTER}/telemetry"),
        firmware_protocol::sim::rumqttc::QoS::AtLeastOnce,
        move |v| {
            if let Some(ts) = v["ts_ms"].as_i64() {
                sink.lock().unwrap().insert(ts);
            }
        },
    )
    .await;
    seen
}
