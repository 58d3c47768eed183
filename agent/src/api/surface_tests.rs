//! The local API's own surface, on an agent in-process (no broker, no backend): who may use the
//! operator endpoints, that a stop is never refused for its body, and the bounds on connections
//! and bodies that keep a stranger on the network from holding the API.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::testing::{self, TestAgent};

const TOKEN: &str = "operator-token-for-tests";

fn with_token() -> String {
    format!("[safety]\noperator_token = \"{TOKEN}\"\n")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

const HOLD: &str =
    r#"{"master":"ESP32_X","slave_mac":"14:33:5C:38:BF:60","relay":0,"max_seconds":5}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_operator_token_the_operator_endpoints_are_closed_with_a_clear_message() {
    let agent = testing::offline("").await;
    for (path, body) in [
        ("/emergency/reset", "{}"),
        ("/controls/hold", HOLD),
        ("/controls/release", HOLD),
        ("/macros/m1/run", ""),
    ] {
        for auth in ["", "Bearer ", "Bearer anything"] {
            let headers: Vec<(&str, &str)> = if auth.is_empty() {
                vec![]
            } else {
                vec![("authorization", auth)]
            };
            let (status, answer) = agent.send("POST", path, &headers, body).await;
            assert_eq!(status, 403, "{path} {auth:?}: {answer}");
            let message = answer["error"].as_str().unwrap_or_default();
            assert!(message.contains("operator_token"), "{path}: {answer}");
        }
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_token_resets_the_emergency_stop() {
    let agent = testing::offline(&with_token()).await;
    let (status, _) = agent.send("POST", "/emergency/stop", &[], "").await;
    assert_eq!(status, 200);
    for auth in [
        None,
        Some(bearer("")),
        Some(bearer("operator-token-for-test")),
    ] {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let (status, _) = agent.send("POST", "/emergency/reset", &headers, "").await;
        assert_eq!(status, 401, "{auth:?}");
    }
    let auth = bearer(TOKEN);
    let (status, answer) = agent
        .send("POST", "/emergency/reset", &[("authorization", &auth)], "")
        .await;
    assert_eq!(status, 200, "{answer}");
    agent.stop().await;
}

/// The stop's reason as `/emergency` shows it, once latched.
async fn latched_reason(agent: &TestAgent) -> String {
    testing::eventually("the stop latched", 5, || async {
        let (_, state) = agent.send("GET", "/emergency", &[], "").await;
        state["emergency"]["reason"].as_str().map(str::to_string)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_post_to_the_emergency_stop_stops_and_a_reason_that_cannot_be_read_is_recorded_as_unreadable()
 {
    let agent = testing::offline(&with_token()).await;
    let auth = bearer(TOKEN);
    let large_json = format!(r#"{{"reason":"{}"}}"#, "x".repeat(100_000));
    // Beyond axum's default body limit (2 MB), which used to answer 413.
    let huge_json = format!(r#"{{"reason":"{}"}}"#, "x".repeat(3_000_000));
    let cases: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
        (None, vec![], "stop pressed on the local API"),
        (
            Some("application/json"),
            vec![],
            "stop pressed on the local API",
        ),
        (
            Some("application/json"),
            b"{}".to_vec(),
            "stop pressed on the local API",
        ),
        (
            Some("application/json"),
            br#"{"reason":"pump leak","extra":1}"#.to_vec(),
            "pump leak",
        ),
        (
            Some("application/x-www-form-urlencoded"),
            b"reason=pump+leak".to_vec(),
            "(unreadable reason: ",
        ),
        (
            Some("text/plain"),
            b"pump leak".to_vec(),
            "(unreadable reason: ",
        ),
        (
            Some("application/json"),
            b"{\"reason\":".to_vec(),
            "(unreadable reason: ",
        ),
        (
            Some("application/json"),
            br#"{"reason":42}"#.to_vec(),
            "(unreadable reason: ",
        ),
        (
            Some("application/json"),
            large_json.into_bytes(),
            "(unreadable reason: ",
        ),
        (
            Some("application/json"),
            huge_json.into_bytes(),
            "(unreadable reason: ",
        ),
    ];
    for (content_type, body, reason) in cases {
        let headers: Vec<(&str, &str)> = content_type
            .map(|c| vec![("content-type", c)])
            .unwrap_or_default();
        let (status, answer) = agent.send("POST", "/emergency/stop", &headers, body).await;
        assert_eq!(status, 200, "{content_type:?} {reason}: {answer}");
        assert_eq!(answer["latched"], true, "{answer}");
        let recorded = latched_reason(&agent).await;
        assert!(recorded.starts_with(reason), "{content_type:?}: {recorded}");
        let (status, _) = agent
            .send("POST", "/emergency/reset", &[("authorization", &auth)], "")
            .await;
        assert_eq!(status, 200);
        testing::eventually("the stop reset", 5, || async {
            let (_, state) = agent.send("GET", "/emergency", &[], "").await;
            (state["latched"] == false).then_some(())
        })
        .await;
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_whose_body_never_comes_stops_within_a_second_or_two() {
    let agent = testing::offline("").await;
    let started = Instant::now();
    let line = tokio::time::timeout(
        Duration::from_secs(5),
        status_line(
            agent.addr,
            "POST /emergency/stop HTTP/1.1\r\nHost: pi\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"rea",
        ),
    )
    .await
    .expect("an answer within 5 s");
    assert_eq!(line.as_deref(), Some("HTTP/1.1 200 OK"));
    assert!(started.elapsed() < Duration::from_secs(3));
    let reason = latched_reason(&agent).await;
    assert_eq!(
        reason,
        "(unreadable reason: the body did not arrive in time)"
    );
    agent.stop().await;
}

/// Sends `head` (a request without its body) and returns the status line of the answer, or
/// None if the connection closed first.
async fn status_line(addr: std::net::SocketAddr, head: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    text.lines().next().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_request_with_a_huge_body_is_refused_without_reading_the_body() {
    let agent = testing::offline(&with_token()).await;
    for (method, path) in [
        ("POST", "/emergency/reset"),
        ("POST", "/controls/hold"),
        ("POST", "/controls/release"),
        ("POST", "/macros/m1/run"),
        ("POST", "/rest/v1/rpc/get_and_lock_slave_commands"),
        ("POST", "/rest/v1/rpc/complete_slave_command"),
        ("POST", "/rest/v1/rpc/fail_slave_command"),
        ("POST", "/rest/v1/rpc/get_active_decision_rules"),
        ("PATCH", "/rest/v1/relay_commands_slave?id=eq.1"),
    ] {
        // The headers announce 10 MB and no byte of it ever comes: only an answer from the
        // headers alone can arrive.
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: pi\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        );
        let started = Instant::now();
        let line = tokio::time::timeout(Duration::from_secs(3), status_line(agent.addr, &head))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer within 3 s"));
        assert_eq!(
            line.as_deref(),
            Some("HTTP/1.1 401 Unauthorized"),
            "{method} {path}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{method} {path}"
        );
    }
    agent.stop().await;
}

/// A local API with `limits` serving one route, until the returned token is cancelled.
async fn serve_with(
    limits: super::ServeLimits,
) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(super::serve(listener, app, limits, cancel.clone()));
    (addr, cancel)
}

/// Reads until the peer closes; how long that took, or None if it stayed open for `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
    let (addr, cancel) = serve_with(super::ServeLimits {
        header_read_timeout: Duration::from_millis(300),
        ..super::ServeLimits::default()
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let after = closed_within(&mut silent, Duration::from_secs(3))
        .await
        .expect("the silent connection is closed");
    assert!(after >= Duration::from_millis(250), "{after:?}");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_that_goes_idle_is_closed_after_the_timeout() {
    let (addr, cancel) = serve_with(super::ServeLimits {
        header_read_timeout: Duration::from_millis(300),
        ..super::ServeLimits::default()
    })
    .await;
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: pi\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    closed_within(&mut idle, Duration::from_secs(3))
        .await
        .expect("the idle connection is closed");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_the_limit_is_closed_at_once_and_a_slot_frees_when_one_ends() {
    let (addr, cancel) = serve_with(super::ServeLimits {
        header_read_timeout: Duration::from_secs(30),
        connections_max: 2,
    })
    .await;
    let held: Vec<_> = futures_connect(addr, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    closed_within(&mut third, Duration::from_secs(2))
        .await
        .expect("the connection over the limit is closed at once");
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let line = status_line(addr, "GET / HTTP/1.1\r\nHost: pi\r\n\r\n").await;
    assert_eq!(line.as_deref(), Some("HTTP/1.1 200 OK"));
    cancel.cancel();
}

async fn futures_connect(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    streams
}

/// A broker that answers every CONNECT with CONNACK `return_code`; its `mqtt://` URL.
async fn refusing_broker(return_code: u8) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mqtt://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(&[0x20, 0x02, 0x00, return_code]).await;
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_broker_refuses_its_password_is_degraded_with_the_reason_in_health_and_metrics()
 {
    // CONNACK 4: bad user name or password.
    let broker = refusing_broker(4).await;
    let agent = testing::start(
        &format!("url = \"{broker}\"\nusername = \"pi\"\npassword = \"wrong\""),
        "",
    )
    .await;
    let health = testing::eventually("the refusal in /health", 10, || async {
        let health = agent.health().await;
        (health["status"] == "degraded").then_some(health)
    })
    .await;
    assert_eq!(health["mqtt"]["state"], "bad_credentials", "{health}");
    assert_eq!(health["mqtt_connected"], false, "{health}");
    let reasons = health["degraded_reasons"].to_string();
    assert!(reasons.contains("username or password"), "{health}");
    let metrics = agent.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "autocore_agent_mqtt_state{state=\"bad_credentials\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "autocore_agent_mqtt_connected 0"),
        "{metrics}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_broker_or_backend_is_offline_but_ok() {
    let agent = testing::offline("").await;
    let health = testing::eventually("both links tried", 10, || async {
        let health = agent.health().await;
        (health["mqtt"]["state"] == "unreachable" && health["backend"]["state"] == "unreachable")
            .then_some(health)
    })
    .await;
    assert_eq!(
        health["status"], "ok",
        "offline is a normal state: {health}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_broker_fails_the_tls_handshake_is_degraded_with_a_tls_error() {
    // Speaks plain text where TLS is expected: the handshake fails as with a wrong CA.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mqtts://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(b"this is not TLS\r\n\r\n").await;
        }
    });
    let agent = testing::start(&format!("url = \"{url}\""), "").await;
    let health = testing::eventually("the TLS failure in /health", 10, || async {
        let health = agent.health().await;
        (health["status"] == "degraded").then_some(health)
    })
    .await;
    assert_eq!(health["mqtt"]["state"], "tls_error", "{health}");
    assert!(
        health["degraded_reasons"].to_string().contains("TLS"),
        "{health}"
    );
    agent.stop().await;
}

/// A broker on `mqtts://` with a private CA (`[mqtt] ca_file`): the agent completes the TLS
/// handshake with its crypto provider (ring), sends its CONNECT inside it and is connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connects_to_a_tls_broker_signed_by_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let broker_key = rcgen::KeyPair::generate().unwrap();
    let broker = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&broker_key, &rcgen::Issuer::new(ca_params, &ca_key))
        .unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![broker.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(broker_key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mqtts://{}", listener.local_addr().unwrap());
    let (connect_tx, mut connect_rx) = tokio::sync::mpsc::channel::<u8>(4);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let connect_tx = connect_tx.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                // The first packet inside TLS is the CONNECT; a CONNACK accepts it. What
                // follows (subscriptions, pings) is read and left unanswered.
                let mut first = [0u8; 1];
                if tls.read_exact(&mut first).await.is_err() {
                    return;
                }
                let _ = connect_tx.send(first[0]).await;
                let mut rest = [0u8; 512];
                let _ = tls.read(&mut rest).await;
                let _ = tls.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
                while matches!(tls.read(&mut rest).await, Ok(n) if n > 0) {}
            });
        }
    });
    let agent = testing::start(
        &format!("url = \"{url}\"\nca_file = \"{}\"", ca_file.display()),
        "",
    )
    .await;
    let packet = tokio::time::timeout(Duration::from_secs(10), connect_rx.recv())
        .await
        .expect("a CONNECT inside TLS within 10 s")
        .unwrap();
    assert_eq!(packet >> 4, 1, "MQTT CONNECT is packet type 1");
    let health = testing::eventually("connected over TLS in /health", 10, || async {
        let health = agent.health().await;
        (health["mqtt"]["state"] == "connected").then_some(health)
    })
    .await;
    assert_eq!(health["mqtt"]["state"], "connected", "{health}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_housekeeper_runs_and_shows_the_history_and_the_database_in_the_metrics() {
    let agent = testing::offline("[history]\nhousekeeping_interval_ms = 100\n").await;
    let bytes = testing::eventually("the database's size in /metrics", 10, || async {
        let metrics = agent.metrics().await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("autocore_agent_database_bytes "))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|b| *b > 0)
    })
    .await;
    assert!(bytes >= 4_096, "{bytes}");
    let metrics = agent.metrics().await;
    for line in [
        "autocore_agent_history_raw_rows 0",
        "autocore_agent_history_rollup_rows 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    agent.stop().await;
}
