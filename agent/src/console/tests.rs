//! The console's surface on an agent in-process (no broker, no backend): the stop needs
//! nothing, everything else a session and its CSRF token; sessions end on sign-out; bodies are
//! bounded; pages and assets carry their caching, compression and security headers.

use crate::testing::{self, TestAgent};

const TOKEN: &str = "operator-token-for-console-tests";

async fn agent() -> TestAgent {
    testing::offline(&format!("[safety]\noperator_token = \"{TOKEN}\"\n")).await
}

fn client() -> reqwest011::Client {
    reqwest011::Client::builder()
        .redirect(reqwest011::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Signs in; the session cookie (`name=value`) and the page's CSRF token.
async fn sign_in(agent: &TestAgent) -> (String, String) {
    let http = client();
    let r = http
        .post(format!("{}/console/signin", agent.url))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(part), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let page = http
        .get(format!("{}/console", agent.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    assert_eq!(csrf.len(), 64, "{page}");
    (cookie, csrf)
}

async fn post(
    agent: &TestAgent,
    path: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
    form: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let mut request = client()
        .post(format!("{}{path}", agent.url))
        .header("accept", "application/json")
        .form(form);
    if let Some(c) = cookie {
        request = request.header("cookie", c);
    }
    if let Some(t) = csrf {
        request = request.header("x-csrf-token", t);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_needs_nothing_and_everything_else_needs_a_session() {
    let agent = agent().await;
    // Not a form, no session, no CSRF token: it stops all the same.
    let r = client()
        .post(format!("{}/console/stop", agent.url))
        .header("accept", "application/json")
        .body(vec![0xff, 0x00, 0x7b])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    testing::eventually("the stop latched", 5, || async {
        let (_, state) = agent.send("GET", "/emergency", &[], "").await;
        (state["latched"] == true).then_some(())
    })
    .await;
    for path in [
        "/console/reset",
        "/console/switch",
        "/console/hold",
        "/console/macros/run",
        "/console/signout",
    ] {
        let (status, answer) = post(&agent, path, None, None, &[]).await;
        assert_eq!(status, 401, "{path}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains("sign in"));
    }
    let (_, state) = agent.send("GET", "/emergency", &[], "").await;
    assert_eq!(state["latched"], true, "still latched: {state}");
    for path in ["/console", "/console/relays", "/console/events"] {
        let r = client()
            .get(format!("{}{path}", agent.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/console/signin");
    }
    let r = client()
        .get(format!("{}/console/live", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .post(format!("{}/console/signin", agent.url))
        .form(&[("token", "operator-token-for-console-test")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_needs_its_own_csrf_token_and_ends_at_sign_out() {
    let agent = agent().await;
    let (cookie, csrf) = sign_in(&agent).await;
    let (_, other_csrf) = sign_in(&agent).await;
    post(&agent, "/console/stop", None, None, &[]).await;
    for given in [None, Some(""), Some("0"), Some(other_csrf.as_str())] {
        let (status, answer) = post(&agent, "/console/reset", Some(&cookie), given, &[]).await;
        assert_eq!(status, 403, "{given:?}: {answer}");
    }
    // The form field works as well as the header.
    let (status, answer) = post(
        &agent,
        "/console/reset",
        Some(&cookie),
        None,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["latched"], false);
    // A form larger than the bound is refused, not read.
    let big = "x".repeat(super::FORM_BYTES_MAX + 1);
    let (status, _) = post(
        &agent,
        "/console/switch",
        Some(&cookie),
        Some(&csrf),
        &[("pad", &big)],
    )
    .await;
    assert_eq!(status, 413);
    // Bad input gets a clear refusal.
    let (status, answer) = post(
        &agent,
        "/console/switch",
        Some(&cookie),
        Some(&csrf),
        &[
            ("master", "M"),
            ("slave", "14:33:5C:38:BF:60"),
            ("action", "sideways"),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("action must be on or off")
    );
    let (status, _) = post(&agent, "/console/signout", Some(&cookie), Some(&csrf), &[]).await;
    assert_eq!(status, 200);
    let (status, _) = post(&agent, "/console/reset", Some(&cookie), Some(&csrf), &[]).await;
    assert_eq!(status, 401, "the session ended");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_assets_are_gzipped_cached_as_they_should_be_and_locked_down() {
    let agent = agent().await;
    let (cookie, _) = sign_in(&agent).await;
    let r = client()
        .get(format!("{}/console", agent.url))
        .header("cookie", &cookie)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let url = format!("{}/console/assets/console.js", agent.url);
    let r = client()
        .get(&url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert!(
        r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = client()
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = client()
        .get(format!("{}/console/assets/other.js", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_whose_body_never_comes_stops_at_once() {
    use tokio::io::AsyncWriteExt as _;
    let agent = agent().await;
    let mut stream = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    stream
        .write_all(
            b"POST /console/stop HTTP/1.1\r\nhost: pi\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 1000\r\n\r\nback=",
        )
        .await
        .unwrap();
    // Latched while the body is still awaited (a form is read for 10 s at most elsewhere).
    testing::eventually("the stop latched", 5, || async {
        let (_, state) = agent.send("GET", "/emergency", &[], "").await;
        (state["latched"] == true).then_some(())
    })
    .await;
    drop(stream);
    agent.stop().await;
}
