//! Notifications from the Pi, end to end: a local HTTP receiver on a free loopback port plays a
//! webhook target and the Telegram Bot API; the agent's emergency stop from its local API reaches
//! both, signed, with the backend stopped; a receiver that is down gets it once it is up, also
//! after the agent is killed and started again on the same database.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;

use crate::support::{MASTER, World, eventually, master_toml, spawn_agent, start_agent};

const KEY_HEX: &str = "5a1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const SECRET: &str = "whsec_test_0123456789";
const BOT_TOKEN: &str = "123456:test-token";
const OPERATOR: &str = "operator-token-for-tests";

/// One request the receiver got: its path, headers and body.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

type Log = Arc<Mutex<Vec<Received>>>;

async fn record(
    State(log): State<Log>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    log.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        headers,
        body,
    });
    StatusCode::OK
}

/// Serves the webhook (`/hook/{name}`) and Telegram's `sendMessage` on `listener` until dropped.
fn serve_receiver(listener: tokio::net::TcpListener, log: Log) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/hook/{name}", post(record))
        .route("/{bot}/sendMessage", post(record))
        .with_state(log);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

fn received(log: &Log, path: &str) -> Vec<Received> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == path)
        .cloned()
        .collect()
}

/// Checks the webhook's signature and timestamp as a receiver should.
fn assert_signed(r: &Received) {
    let timestamp: i64 = r.headers["x-autocore-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - timestamp).abs() < 300, "a fresh timestamp");
    let expected = autocore_agent::notify::signature(SECRET.as_bytes(), timestamp, &r.body);
    assert_eq!(
        r.headers["x-autocore-signature"].to_str().unwrap(),
        expected
    );
    assert_eq!(r.headers["content-type"], "application/json");
}

fn notify_toml(base: &str) -> String {
    format!(
        r#"
        [notify]
        telegram_bot_token = "{BOT_TOKEN}"
        telegram_chat_id = "-10042"
        telegram_api_base = "{base}"
        [[notify.webhooks]]
        name = "ops"
        url = "{base}/hook/ops"
        secret = "{SECRET}"
        [[notify.webhooks]]
        name = "resets"
        url = "{base}/hook/resets"
        secret = "{SECRET}"
        kinds = ["emergency_reset"]
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emergency_stop_and_reset_reach_a_signed_webhook_and_telegram_with_the_backend_stopped()
{
    let mut world = World::start_full();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log: Log = Arc::default();
    let _receiver = serve_receiver(listener, log.clone());
    let agent = start_agent(
        &world,
        &format!(
            "[safety]\noperator_token = \"{OPERATOR}\"\n{}\n{}",
            notify_toml(&base),
            master_toml(MASTER, KEY_HEX, "mqtt")
        ),
    )
    .await;
    // The cloud is away: notifications go from the Pi straight to their targets.
    world.stack.stop_backend();

    let http = reqwest::Client::new();
    let stop = http
        .post(format!("{}/emergency/stop", agent.api))
        .json(&serde_json::json!({"reason": "smoke in the pump room", "by": "tester"}))
        .send()
        .await
        .unwrap();
    assert!(stop.status().is_success());
    let hook = eventually("the stop at the webhook", Duration::from_secs(20), || {
        received(&log, "/hook/ops").into_iter().next()
    })
    .await;
    assert_signed(&hook);
    let body = hook.json();
    assert_eq!(body["kind"], "emergency_stop");
    assert_eq!(body["agent_id"], "pi-alice");
    assert!(
        body["text"]
            .as_str()
            .unwrap()
            .contains("smoke in the pump room"),
        "{body}"
    );
    assert_eq!(
        hook.headers["x-autocore-delivery"],
        body["delivery_id"].as_str().unwrap()
    );
    let telegram_path = format!("/bot{BOT_TOKEN}/sendMessage");
    let message = eventually("the stop at Telegram", Duration::from_secs(20), || {
        received(&log, &telegram_path).into_iter().next()
    })
    .await
    .json();
    assert_eq!(message["chat_id"], "-10042");
    assert!(
        message["text"].as_str().unwrap().contains("emergency stop"),
        "{message}"
    );

    let reset = http
        .post(format!("{}/emergency/reset", agent.api))
        .bearer_auth(OPERATOR)
        .json(&serde_json::json!({"by": "tester"}))
        .send()
        .await
        .unwrap();
    assert!(reset.status().is_success());
    let resets = eventually(
        "the reset at both webhooks",
        Duration::from_secs(20),
        || {
            let only_resets = received(&log, "/hook/resets");
            let ops = received(&log, "/hook/ops");
            (!only_resets.is_empty() && ops.len() >= 2).then_some(only_resets)
        },
    )
    .await;
    // The target switched to resets only never heard of the stop.
    assert_eq!(resets.len(), 1);
    assert_signed(&resets[0]);
    assert_eq!(resets[0].json()["kind"], "emergency_reset");
    assert_eq!(
        received(&log, "/hook/ops")[1].json()["kind"],
        "emergency_reset"
    );

    let metrics = http
        .get(format!("{}/metrics", agent.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "autocore_agent_notifications_total{kind=\"emergency_stop\",target=\"webhook:ops\",outcome=\"sent\"} 1"
        ),
        "{metrics}"
    );
    assert!(!metrics.contains(BOT_TOKEN), "the bot token never shows");
    agent.shut_down().await;
}

/// The deliveries waiting in the agent's database, as (target, attempts).
fn waiting(db: &std::path::Path) -> Vec<(String, u32)> {
    let store = autocore_agent::store::Store::open(db).unwrap();
    store
        .notifications_due(i64::MAX, 100)
        .unwrap()
        .into_iter()
        .map(|r| (r.target, r.attempts))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_for_a_receiver_that_is_down_arrives_once_it_is_up_even_across_a_kill() {
    // Nothing listens on these ports: no backend, no broker, and the receiver down at first.
    // The webhook takes only the stop (the agent may report outages of its unreachable backend).
    let port = |what| autocore_stack::free_port().expect(what);
    let receiver_port = port("a port for the receiver");
    let base = format!("http://127.0.0.1:{receiver_port}");
    let api = format!("127.0.0.1:{}", port("a port for the local API"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agent.db");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"pi-notify\"\n[store]\npath = \"{db}\"\n[cloud]\n\
             rest_url = \"http://127.0.0.1:{rest}\"\njwt = \"x.y.z\"\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt}\"\n[api]\nlisten = \"{api}\"\n\
             [notify]\ntelegram_bot_token = \"{BOT_TOKEN}\"\ntelegram_chat_id = \"7\"\n\
             telegram_api_base = \"{base}\"\ntelegram_kinds = []\n\
             [[notify.webhooks]]\nname = \"ops\"\nurl = \"{base}/hook/ops\"\nsecret = \"{SECRET}\"\n\
             kinds = [\"emergency_stop\"]\n",
            db = db.display(),
            rest = port("a port without a backend"),
            mqtt = port("a port without a broker"),
        ),
    )
    .unwrap();
    let mut agent = spawn_agent(&config);
    let http = reqwest::Client::new();
    eventually("the local API", Duration::from_secs(20), || {
        std::net::TcpStream::connect(&api).ok()
    })
    .await;
    let stop = http
        .post(format!("http://{api}/emergency/stop"))
        .body("restart test")
        .send()
        .await
        .unwrap();
    assert!(stop.status().is_success());
    eventually(
        "a failed attempt at the webhook",
        Duration::from_secs(20),
        || {
            let rows = waiting(&db);
            (rows.len() == 1 && rows[0].1 >= 1).then_some(())
        },
    )
    .await;
    // SIGKILL: no shutdown code runs; only what is on disk remains.
    agent.kill();
    assert_eq!(waiting(&db).len(), 1, "the delivery survived the kill");

    let mut agent = spawn_agent(&config);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", receiver_port))
        .await
        .expect("the receiver's port is still free");
    let log: Log = Arc::default();
    let _receiver = serve_receiver(listener, log.clone());
    let hook = eventually("the stop at the webhook", Duration::from_secs(60), || {
        received(&log, "/hook/ops").into_iter().next()
    })
    .await;
    assert_signed(&hook);
    assert_eq!(hook.json()["kind"], "emergency_stop");
    eventually("the delivery done", Duration::from_secs(20), || {
        waiting(&db).is_empty().then_some(())
    })
    .await;
    assert_eq!(
        received(&log, "/hook/ops").len(),
        1,
        "delivered exactly once"
    );
    assert!(
        log.lock().unwrap().iter().all(|r| r.path == "/hook/ops"),
        "Telegram, with no kind switched on, got nothing"
    );
    agent.kill();
}
