//! An agent in-process for tests of its own surfaces (the local API, /health): its broker and
//! backend are loopback addresses where nothing of ours listens, unless a test gives its own.

use std::net::SocketAddr;

use tokio::sync::oneshot;

use crate::config::AgentConfig;

/// Loopback port 9 (discard): nothing listens there, so a connection is refused at once.
pub const NOWHERE: &str = "127.0.0.1:9";

pub struct TestAgent {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Starts an agent whose `[mqtt]` section is `mqtt` (its lines), with `tail` (whole sections,
/// e.g. `[safety]`) appended to its configuration.
pub async fn start(mqtt: &str, tail: &str) -> TestAgent {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[agent]\nid = \"pi-test\"\n[store]\npath = \"{db}\"\n[cloud]\nrest_url = \"http://{NOWHERE}\"\njwt = \"t\"\npoll_interval_ms = 200\n[mqtt]\n{mqtt}\n{tail}\n",
        db = dir.path().join("agent.db").display(),
    );
    let config =
        AgentConfig::from_toml(&text, std::path::Path::new("test.toml"), std::iter::empty())
            .unwrap_or_else(|e| panic!("{e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        crate::run(config, listener, async move {
            let _ = stopped.await;
        })
        .await
        .expect("the agent runs");
    });
    TestAgent {
        url: format!("http://{addr}"),
        addr,
        stop: Some(stop),
        task: Some(task),
        _dir: dir,
    }
}

/// An agent with neither broker nor backend.
pub async fn offline(tail: &str) -> TestAgent {
    start(&format!("url = \"mqtt://{NOWHERE}\""), tail).await
}

impl TestAgent {
    /// One request; the status and the body as JSON (Null if not JSON).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Vec<u8>>,
    ) -> (u16, serde_json::Value) {
        let client = reqwest011::Client::new();
        let mut request = client.request(
            reqwest011::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", self.url),
        );
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .body(body.into())
            .send()
            .await
            .expect("the local API answers");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn health(&self) -> serde_json::Value {
        self.send("GET", "/health", &[], Vec::new()).await.1
    }

    pub async fn metrics(&self) -> String {
        reqwest011::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops the agent as SIGTERM does and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Polls `probe` every 50 ms until it returns Some, or panics after `seconds` with `what`.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    seconds: u64,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {seconds} s waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An agent's shared state over a real store in `dir`, its backend at `backend` (host:port) and
/// its broker nowhere; `masters` (TOML `[[masters]]` tables) and `cloud` (lines of `[cloud]`)
/// are added to the configuration. The tasks are not started: a test runs the ones it needs.
pub fn shared_state(
    dir: &std::path::Path,
    backend: &str,
    masters: &str,
    cloud: &str,
) -> (
    std::sync::Arc<crate::shared::Shared>,
    tokio::sync::mpsc::Receiver<crate::store::Reading>,
) {
    let text = format!(
        "[agent]\nid = \"pi-test\"\n[store]\npath = \"{db}\"\n[cloud]\nrest_url = \"http://{backend}\"\njwt = \"x.y.z\"\n{cloud}\n[mqtt]\nurl = \"mqtt://{NOWHERE}\"\n{masters}",
        db = dir.join("agent.db").display(),
    );
    let config = AgentConfig::from_toml(&text, std::path::Path::new("t.toml"), Vec::new()).unwrap();
    let store =
        crate::store::StoreHandle::new(crate::store::Store::open(&config.store.path).unwrap());
    let cloud = crate::cloud::Cloud::new(
        &crate::cloud::CloudConfig {
            rest_url: config.cloud.rest_url.clone(),
            api_key: None,
            request_timeout: std::time::Duration::from_secs(1),
        },
        crate::cloud::TokenSource::Inline(crate::config::Secret::new("x.y.z")),
    );
    let (mqtt, _eventloop) = crate::bridge::mqtt_client(
        crate::bridge::mqtt_options(&config.mqtt, &config.agent.id).unwrap(),
    );
    let (automation, _) = tokio::sync::mpsc::channel(8);
    let (engine, readings) = tokio::sync::mpsc::channel(64);
    let shared = crate::shared::Shared::new(crate::shared::SharedParts {
        config,
        store,
        cloud,
        keys: std::collections::HashMap::new(),
        mqtt,
        automation,
        engine,
    });
    (std::sync::Arc::new(shared), readings)
}
