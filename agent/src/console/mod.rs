//! The operator console: the Pi's own web pages, served by the agent on `[api] listen` with
//! every asset inside the binary, so it works with the uplink down (docs/decisions/0019).
//! Server-rendered HTML ([`pages`], maud), one small script for live updates over SSE
//! ([`live`]) and hold-to-run ([`lease`]), one stylesheet. Sign-in with the operator token
//! opens a session ([`session`]); every state-changing request needs it and its CSRF token,
//! except the emergency stop, which anyone on the Pi's network may press, as on the API.

pub mod assets;
pub mod chart;
pub mod journal;
pub mod lease;
pub mod live;
pub mod pages;
pub mod session;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::oneshot;

pub use journal::Journal;

use crate::automation::LatchSource;
use crate::automation::task::AutomationInput;
use crate::safety::{RelayRef, Switch};
use crate::shared::{Shared, now_ms};
use session::{Active, Sessions};

/// The most of a console form the agent reads; every valid one is far smaller.
pub const FORM_BYTES_MAX: usize = 8 * 1024;
const FORM_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a wrong operator token waits for its refusal.
pub const SIGNIN_REFUSAL_DELAY: Duration = Duration::from_millis(500);
/// Longest a console switch-on may ask for (the interlocks cap it further).
pub const SWITCH_SECONDS_MAX: u32 = 86_400;

/// The console's state in the agent: sessions and hold-to-run leases.
#[derive(Debug, Default)]
pub struct ConsoleState {
    sessions: Mutex<Sessions>,
    pub(crate) leases: lease::Leases,
}

impl ConsoleState {
    /// Signed-in sessions now (for the benchmark and tests).
    pub fn sessions_open(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }
}

pub fn console_app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(pages::overview))
        .route("/console/devices", get(pages::devices))
        .route("/console/relays", get(pages::relays))
        .route("/console/rules", get(pages::rules))
        .route("/console/telemetry", get(pages::telemetry))
        .route("/console/macros", get(pages::macros))
        .route("/console/events", get(pages::events))
        .route("/console/signin", get(pages::signin).post(signin))
        .route("/console/signout", post(signout))
        .route("/console/stop", post(stop))
        .route("/console/reset", post(reset))
        .route("/console/switch", post(switch))
        .route("/console/hold", post(lease::hold))
        .route("/console/hold/keepalive", post(lease::keepalive))
        .route("/console/hold/release", post(lease::release))
        .route("/console/macros/run", post(run_macro))
        .route("/console/macros/cancel", post(cancel_macro))
        .route("/console/live", get(live::events))
        .route("/console/assets/{name}", get(assets::serve))
        .with_state(shared)
}

// ------------------------------------------------------------------------------ requests

/// The session a request's cookie names, if it is open.
pub(crate) fn session_of(shared: &Shared, headers: &HeaderMap) -> Option<(String, Active)> {
    let id = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::session_cookie)?
        .to_string();
    let active = shared.console.sessions.lock().ok()?.touch(&id, now_ms())?;
    Some((id, active))
}

/// A form's fields, in order (a name may repeat: the relays of one switch).
#[derive(Debug, Default)]
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A refused or answered action, as JSON for the page's script or, for a plain form post,
/// as a redirect back to the page with the message.
pub(crate) struct Outcome {
    status: StatusCode,
    message: String,
    extra: serde_json::Value,
}

impl Outcome {
    pub(crate) fn ok(message: impl Into<String>) -> Outcome {
        Outcome {
            status: StatusCode::OK,
            message: message.into(),
            extra: json!({}),
        }
    }

    pub(crate) fn refused(status: StatusCode, message: impl Into<String>) -> Outcome {
        Outcome {
            status,
            message: message.into(),
            extra: json!({}),
        }
    }

    fn with(mut self, extra: serde_json::Value) -> Outcome {
        self.extra = extra;
        self
    }

    pub(crate) fn respond(self, headers: &HeaderMap, form: &Form) -> Response {
        let wants_json = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"));
        if wants_json {
            let mut body = json!({"ok": self.status.is_success(), "message": self.message});
            if let (Some(b), Some(extra)) = (body.as_object_mut(), self.extra.as_object()) {
                b.extend(extra.clone());
            }
            return (self.status, axum::Json(body)).into_response();
        }
        // Back to the console page the form was on (never elsewhere: an open redirect).
        let back = form
            .get("back")
            .filter(|b| b.starts_with("/console") && !b.contains("//") && !b.contains('?'))
            .unwrap_or("/console");
        if !self.status.is_success() {
            // A refusal keeps its status, with a page that says why.
            let page = maud::html! {
                (maud::DOCTYPE)
                html lang="en" { head { meta charset="utf-8"; title { "Refused · AutoCore Edge" } }
                    body { h1 { "Refused" } p { (self.message) } p { a href=(back) { "Back" } } } }
            };
            return assets::html(headers, self.status, page.into_string());
        }
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("notice", &self.message)
            .finish();
        Redirect::to(&format!("{back}?{query}")).into_response()
    }
}

/// Reads a urlencoded form of at most [`FORM_BYTES_MAX`].
pub(crate) async fn read_form(mut body: Body) -> Result<Form, Outcome> {
    let (bytes, read) = crate::api::read_prefix(&mut body, FORM_BYTES_MAX, FORM_READ_TIMEOUT).await;
    if let Err(cut) = read {
        return Err(Outcome::refused(cut.status(), cut.describe(FORM_BYTES_MAX)));
    }
    Ok(Form(
        url::form_urlencoded::parse(&bytes)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    ))
}

/// The operator's state-changing request: an open session (checked before the body is read)
/// and its CSRF token in the `X-CSRF-Token` header or the form's `csrf` field.
pub(crate) async fn operator_form(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<Form, (Outcome, Form)> {
    let Some((_, active)) = session_of(shared, headers) else {
        return Err((
            Outcome::refused(
                StatusCode::UNAUTHORIZED,
                "sign in with the operator token first",
            ),
            Form::default(),
        ));
    };
    let form = read_form(body).await.map_err(|o| (o, Form::default()))?;
    let given = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .or_else(|| form.get("csrf"))
        .unwrap_or_default();
    if !session::csrf_matches(&active, given) {
        return Err((
            Outcome::refused(
                StatusCode::FORBIDDEN,
                "the request's CSRF token is missing or wrong: reload the page",
            ),
            form,
        ));
    }
    Ok(form)
}

pub(crate) async fn ask<T>(
    shared: &Shared,
    make: impl FnOnce(oneshot::Sender<T>) -> AutomationInput,
) -> Result<T, Outcome> {
    let gone = || {
        Outcome::refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )
    };
    let (tx, rx) = oneshot::channel();
    shared.automation.send(make(tx)).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}

/// The relay a form names (`master`, `slave`, `relay`).
pub(crate) fn relay_of(form: &Form) -> Result<RelayRef, Outcome> {
    let bad = |m: &str| Outcome::refused(StatusCode::BAD_REQUEST, m.to_string());
    let master = form.get("master").ok_or_else(|| bad("master is missing"))?;
    let slave = form.get("slave").ok_or_else(|| bad("slave is missing"))?;
    let relay = form
        .get("relay")
        .and_then(|r| r.parse::<u8>().ok())
        .ok_or_else(|| bad("relay must be a number 0..=15"))?;
    Ok(RelayRef::new(master, slave, relay))
}

// ------------------------------------------------------------------------------- actions

/// The operator token in constant time against the configured one.
fn token_matches(shared: &Shared, given: &str) -> Option<bool> {
    let expected = shared
        .config
        .safety
        .operator_token
        .as_ref()
        .filter(|t| !t.expose().trim().is_empty())?;
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let (a, b) = (digest(given), digest(expected.expose()));
    use subtle::ConstantTimeEq as _;
    Some(!given.is_empty() && bool::from(a.as_ref().ct_eq(b.as_ref())))
}

fn random_hex() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    // SystemRandom fails only if the OS has no randomness: no session then.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return String::new();
    }
    hex::encode(bytes)
}

async fn signin(State(shared): State<Arc<Shared>>, body: Body) -> Response {
    let form = match read_form(body).await {
        Ok(f) => f,
        Err(o) => return o.respond(&HeaderMap::new(), &Form::default()),
    };
    let given = form.get("token").unwrap_or_default();
    match token_matches(&shared, given) {
        None => pages::signin_page(
            &shared,
            StatusCode::FORBIDDEN,
            Some("the console is closed: no [safety] operator_token is configured on this agent"),
        ),
        Some(false) => {
            tracing::warn!("console: sign-in refused (wrong operator token)");
            // Slows guessing down; connections are bounded, so this cannot pile up.
            tokio::time::sleep(SIGNIN_REFUSAL_DELAY).await;
            pages::signin_page(
                &shared,
                StatusCode::UNAUTHORIZED,
                Some("that is not the operator token"),
            )
        }
        Some(true) => {
            let (id, csrf) = (random_hex(), random_hex());
            if id.is_empty() || csrf.is_empty() {
                return pages::signin_page(
                    &shared,
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some("no randomness for a session"),
                );
            }
            if let Ok(mut sessions) = shared.console.sessions.lock() {
                sessions.open(&id, &csrf, now_ms());
            }
            tracing::info!("console: operator signed in");
            let mut response = Redirect::to("/console").into_response();
            if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id)) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
    }
}

async fn signout(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let form = match operator_form(&shared, &headers, body).await {
        Ok(f) => f,
        Err((o, f)) => return o.respond(&headers, &f),
    };
    if let Some((id, _)) = session_of(&shared, &headers)
        && let Ok(mut sessions) = shared.console.sessions.lock()
    {
        sessions.close(&id);
    }
    let mut response = Outcome::ok("signed out").respond(&headers, &form);
    if !response.status().is_success() {
        response = Redirect::to("/console/signin").into_response();
    }
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// The emergency stop: no session, no CSRF token, and a body that cannot be read still stops.
async fn stop(State(shared): State<Arc<Shared>>, headers: HeaderMap, mut body: Body) -> Response {
    // Stopped first: the body (only the page to go back to) may be slow or anything at all.
    let stopped = ask(&shared, |reply| AutomationInput::Stop {
        reason: "stop pressed on the operator console".into(),
        by: "console".into(),
        source: LatchSource::LocalApi,
        reply: Some(reply),
    })
    .await;
    let (bytes, _) = crate::api::read_prefix(
        &mut body,
        FORM_BYTES_MAX,
        crate::api::operator::STOP_BODY_READ_TIMEOUT,
    )
    .await;
    let form = Form(
        url::form_urlencoded::parse(&bytes)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    );
    match stopped {
        Ok(_) => Outcome::ok("EMERGENCY STOP latched: every relay is switched off").with(
            json!({"latched": true, "latch_text": "EMERGENCY STOP latched by console: stop pressed on the operator console"}),
        ),
        Err(o) => o,
    }
    .respond(&headers, &form)
}

async fn reset(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let form = match operator_form(&shared, &headers, body).await {
        Ok(f) => f,
        Err((o, f)) => return o.respond(&headers, &f),
    };
    match ask(&shared, |reply| AutomationInput::Reset {
        by: "console operator".into(),
        source: LatchSource::LocalApi,
        reply: Some(reply),
    })
    .await
    {
        Ok(true) => Outcome::ok("emergency stop reset: nothing switches back on by itself")
            .with(json!({"latched": false, "latch_text": ""})),
        Ok(false) => Outcome::refused(StatusCode::CONFLICT, "the emergency stop is not latched"),
        Err(o) => o,
    }
    .respond(&headers, &form)
}

/// On (for `seconds`, 0 = until off within the relay's maximum) or off, for one or more relays
/// of one slave at once (`relay` repeated).
async fn switch(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let form = match operator_form(&shared, &headers, body).await {
        Ok(f) => f,
        Err((o, f)) => return o.respond(&headers, &f),
    };
    switch_form(&shared, &form).await.respond(&headers, &form)
}

async fn switch_form(shared: &Shared, form: &Form) -> Outcome {
    let bad = |m: String| Outcome::refused(StatusCode::BAD_REQUEST, m);
    let (Some(master), Some(slave)) = (form.get("master"), form.get("slave")) else {
        return bad("master and slave are required".into());
    };
    let on = match form.get("action") {
        Some("on") => true,
        Some("off") => false,
        other => return bad(format!("action must be on or off, got {other:?}")),
    };
    let seconds = match form.get("seconds").filter(|s| !s.trim().is_empty()) {
        None => 0,
        Some(s) => match s.trim().parse::<u32>() {
            Ok(n) if n <= SWITCH_SECONDS_MAX => n,
            _ => {
                return bad(format!(
                    "seconds must be 0..={SWITCH_SECONDS_MAX}, got {s:?}"
                ));
            }
        },
    };
    let mut switches = Vec::new();
    for r in form.all("relay") {
        match r.parse::<u8>() {
            Ok(n) => switches.push((
                n,
                if on {
                    Switch::On {
                        duration_s: seconds,
                    }
                } else {
                    Switch::Off
                },
            )),
            Err(_) => return bad(format!("relay {r:?} is not a number")),
        }
    }
    if switches.is_empty() {
        return bad("choose at least one relay".into());
    }
    let (master, slave_mac) = (master.to_string(), slave.to_string());
    let device = master.clone();
    let outcome = match ask(shared, |reply| AutomationInput::Switch {
        master,
        slave_mac: slave_mac.clone(),
        switches,
        reply,
    })
    .await
    {
        Ok(Ok(plan)) => Outcome::ok(format!("sent to {slave_mac}: {plan}")),
        Ok(Err(reason)) => Outcome::refused(
            StatusCode::CONFLICT,
            format!("refused ({slave_mac}): {reason}"),
        ),
        Err(o) => return o,
    };
    // The operator's switches in the Events page, refusals too.
    if let Ok(mut journal) = shared.journal.lock() {
        journal.push_event(journal::Event {
            at_ms: now_ms(),
            event_type: "console_switch".into(),
            severity: if outcome.status.is_success() {
                "info"
            } else {
                "warning"
            }
            .into(),
            device: Some(device),
            message: format!("console operator: {}", outcome.message),
        });
    }
    outcome
}

async fn run_macro(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let form = match operator_form(&shared, &headers, body).await {
        Ok(f) => f,
        Err((o, f)) => return o.respond(&headers, &f),
    };
    let id = form.get("id").unwrap_or_default().to_string();
    match ask(&shared, |reply| AutomationInput::StartMacro {
        id: id.clone(),
        by: "console operator".into(),
        reply,
    })
    .await
    {
        Ok(Ok(run)) => Outcome::ok(format!("macro {id} started (run {run})")),
        Ok(Err(reason)) => Outcome::refused(
            StatusCode::CONFLICT,
            format!("macro {id} not started: {reason}"),
        ),
        Err(o) => o,
    }
    .respond(&headers, &form)
}

async fn cancel_macro(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match operator_form(&shared, &headers, body).await {
        Ok(f) => f,
        Err((o, f)) => return o.respond(&headers, &f),
    };
    let id = form.get("id").unwrap_or_default().to_string();
    match ask(&shared, |reply| AutomationInput::CancelMacro {
        id: id.clone(),
        reply,
    })
    .await
    {
        Ok(true) => Outcome::ok(format!("macro {id} cancelled")),
        Ok(false) => Outcome::refused(StatusCode::CONFLICT, format!("macro {id} is not running")),
        Err(o) => o,
    }
    .respond(&headers, &form)
}

/// `?notice=` on a page: the message of a form posted without the script.
#[derive(Debug, Default, serde::Deserialize)]
pub struct PageQuery {
    pub notice: Option<String>,
    pub severity: Option<String>,
    pub device: Option<String>,
    pub test: Option<String>,
    pub hours: Option<u32>,
}

pub(crate) type PageParams = Query<PageQuery>;

#[cfg(test)]
mod tests;
