//! The console's pages, rendered on the Pi (maud: templates checked by the compiler, values
//! escaped by it). Each page shows the latch banner and the emergency stop; a signed-out
//! visitor sees the sign-in page, which has them too.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::live::{Snapshot, ago_text, relay_key, time_text};
use super::session::Active;
use super::{PageParams, assets, chart, session_of};
use crate::shared::{Shared, now_ms};

/// The replay window the Rules page offers at most (a week).
pub const REPLAY_HOURS_MAX: u32 = 168;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Page {
    Overview,
    Devices,
    Relays,
    Rules,
    Telemetry,
    Macros,
    Events,
    SignIn,
}

const NAV: [(Page, &str, &str); 7] = [
    (Page::Overview, "/console", "Overview"),
    (Page::Devices, "/console/devices", "Devices"),
    (Page::Relays, "/console/relays", "Relays"),
    (Page::Rules, "/console/rules", "Rules"),
    (Page::Telemetry, "/console/telemetry", "Telemetry"),
    (Page::Macros, "/console/macros", "Macros"),
    (Page::Events, "/console/events", "Events"),
];

fn path_of(page: Page) -> &'static str {
    NAV.iter()
        .find(|(p, _, _)| *p == page)
        .map(|(_, path, _)| *path)
        .unwrap_or("/console/signin")
}

/// A hidden field set of every form: the CSRF token and the page to come back to.
fn form_fields(csrf: &str, page: Page) -> Markup {
    html! {
        input type="hidden" name="csrf" value=(csrf);
        input type="hidden" name="back" value=(path_of(page));
    }
}

fn layout(
    page: Page,
    title: &str,
    session: Option<&Active>,
    snapshot: &Snapshot,
    notice: Option<&str>,
    body: Markup,
) -> String {
    let csrf = session.map(|s| s.csrf.as_str()).unwrap_or("");
    let latched = snapshot.emergency.is_some();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="csrf-token" content=(csrf);
                meta name="live" content=(if session.is_some() { "/console/live" } else { "" });
                title { (title) " · AutoCore Edge" }
                link rel="stylesheet" href=(assets::url("console.css"));
                script src=(assets::url("console.js")) defer {}
            }
            body {
                header.top {
                    a.brand href="/console" { "AutoCore Edge" }
                    span #conn .conn role="status" aria-live="polite" hidden { "connection to the agent lost" }
                    form.stop method="post" action="/console/stop" data-js {
                        input type="hidden" name="back" value=(path_of(page));
                        button #stop type="submit" { "EMERGENCY STOP" }
                    }
                }
                div #latch .latch role="alert" hidden[!latched] {
                    span #latch-text { (snapshot.latch_text()) }
                    @if session.is_some() {
                        form method="post" action="/console/reset" data-js {
                            (form_fields(csrf, page))
                            button #reset type="submit" { "Reset emergency stop" }
                        }
                    } @else {
                        " " a href="/console/signin" { "Sign in to reset." }
                    }
                }
                @if session.is_some() {
                    nav aria-label="Pages" {
                        @for (p, path, name) in NAV {
                            a href=(path) aria-current=[(p == page).then_some("page")] { (name) }
                        }
                        form.signout method="post" action="/console/signout" {
                            (form_fields(csrf, page))
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                p #notice .notice role="status" aria-live="polite" { (notice.unwrap_or("")) }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
    .into_string()
}

/// A page whose data the store could not give: said, and logged.
fn store_unavailable(e: &crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "console: the store failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the local store is unavailable",
    )
        .into_response()
}

/// A signed-in page, or the way to the sign-in page.
async fn page(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    which: Page,
    title: &str,
    notice: Option<&str>,
    body: impl FnOnce(&Snapshot, &Active) -> Markup,
) -> Response {
    let Some((_, active)) = session_of(shared, headers) else {
        return Redirect::to("/console/signin").into_response();
    };
    let snapshot = match Snapshot::gather(shared).await {
        Ok(s) => s,
        Err(e) => return store_unavailable(&e),
    };
    let content = body(&snapshot, &active);
    assets::html(
        headers,
        StatusCode::OK,
        layout(which, title, Some(&active), &snapshot, notice, content),
    )
}

/// Whether the backend takes the agent's token, as a person reads it.
fn token_text(state: crate::connectivity::BackendState) -> &'static str {
    use crate::connectivity::BackendState as B;
    match state {
        B::Reachable => "accepted",
        B::Unauthorized => "refused: the JWT is wrong, expired or revoked",
        B::NoToken => "no token",
        B::Unreachable => "unknown while the backend is unreachable",
        B::ServerError => "unknown: the backend answers with errors",
        B::Unknown => "not checked yet",
    }
}

// ---------------------------------------------------------------------------------- pages

pub(crate) async fn signin(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if session_of(&shared, &headers).is_some() {
        return Redirect::to("/console").into_response();
    }
    signin_page(&shared, StatusCode::OK, None)
}

pub(crate) fn signin_page(shared: &Shared, status: StatusCode, problem: Option<&str>) -> Response {
    let snapshot = Snapshot {
        now_ms: now_ms(),
        emergency: shared
            .automation_status
            .lock()
            .ok()
            .and_then(|s| s.emergency.clone()),
        backend: "unknown",
        backend_reachable: true,
        outage_began_ms: None,
        mqtt: "unknown",
        outbox_depth: 0,
        outbox_oldest_age_ms: None,
        devices: vec![],
        slaves: vec![],
        macros_running: vec![],
        held: vec![],
    };
    let body = html! {
        p { "Sign in with the operator token ("  code { "[safety] operator_token" } " in the agent's configuration). The emergency stop above works without signing in." }
        form.signin method="post" action="/console/signin" {
            label for="token" { "Operator token" }
            input #token type="password" name="token" autocomplete="current-password" required autofocus;
            button type="submit" { "Sign in" }
        }
        @if let Some(p) = problem { p.error role="alert" { (p) } }
    };
    assets::html(
        &HeaderMap::new(),
        status,
        layout(Page::SignIn, "Sign in", None, &snapshot, None, body),
    )
}

pub(crate) async fn overview(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: PageParams,
) -> Response {
    let outage = shared
        .journal
        .lock()
        .ok()
        .and_then(|j| j.last_of("backend_outage"));
    let health = shared.health.lock().map(|h| h.clone()).unwrap_or_default();
    page(&shared, &headers, Page::Overview, "Overview", q.notice.as_deref(), |s, _| {
        let online = s.devices.iter().filter(|d| d.online).count();
        html! {
            dl.cards {
                div.card { dt { "Backend" } dd data-live="backend" .bad[!s.backend_reachable] { (s.backend_text()) } }
                div.card { dt { "Outbox" } dd { span data-live="outbox_depth" { (s.outbox_depth) } " rows, oldest " span data-live="outbox_age" { (s.outbox_oldest_age_ms.map(|a| ago_text(a / 1000)).unwrap_or_else(|| "empty".into())) } } }
                div.card { dt { "Masters" } dd data-live="masters" { (online) " online, " (s.devices.len() - online) " offline" } }
                div.card { dt { "Emergency stop" } dd #overview-latch { @if s.emergency.is_some() { "LATCHED" } @else { "not latched" } } }
                div.card { dt { "MQTT" } dd data-live="mqtt" { (s.mqtt.replace('_', " ")) } }
                div.card { dt { "Backend token" } dd .bad[health.backend.state == crate::connectivity::BackendState::Unauthorized] { (token_text(health.backend.state)) @if let Some(e) = &health.last_backend_error { br; small { (e) } } } }
                div.card { dt { "Macros" } dd data-live="macros" { @if s.macros_running.is_empty() { "none running" } @else { @for (id, n) in &s.macros_running { (id) " (step " (n + 1) ") " } } } }
                div.card.wide { dt { "Last outage" } dd { @match &outage {
                    Some(o) => { (time_text(o.at_ms)) ": " (o.message) },
                    None => { "none since the agent started" },
                } } }
            }
        }
    })
    .await
}

pub(crate) async fn devices(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: PageParams,
) -> Response {
    page(&shared, &headers, Page::Devices, "Devices", q.notice.as_deref(), |s, _| {
        html! {
            @if s.devices.is_empty() { p { "No master has been heard of yet." } }
            @for d in &s.devices {
                section.device {
                    h2 { (d.device_id) }
                    dl.facts {
                        dt { "State" } dd data-live={"online:" (d.device_id)} .bad[!d.online] { @if d.online { "online" } @else { "offline" } }
                        dt { "Last seen" } dd { span data-live={"seen:" (d.device_id)} { (d.last_seen_ms.map(|t| ago_text((s.now_ms - t) / 1000)).unwrap_or_else(|| "never".into())) } " ago" }
                        dt { "Firmware" } dd { (d.firmware_version.as_deref().unwrap_or("unknown")) }
                    }
                    @for slave in s.slaves.iter().filter(|x| x.master == d.device_id) {
                        h3 { "Slave " (slave.slave_mac) }
                        ul.relay-states {
                            @for (i, on) in slave.states.iter().enumerate() {
                                li { "Relay " (i) " " (relay_badge(&slave.master, &slave.slave_mac, i as u8, *on)) }
                            }
                        }
                    }
                }
            }
        }
    })
    .await
}

fn relay_badge(master: &str, slave: &str, relay: u8, on: bool) -> Markup {
    html! {
        span.relay data-relay=(relay_key(master, slave, relay)) data-on=(on) { @if on { "on" } @else { "off" } }
    }
}

pub(crate) async fn relays(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: PageParams,
) -> Response {
    page(&shared, &headers, Page::Relays, "Relays", q.notice.as_deref(), |s, active| {
        let csrf = active.csrf.as_str();
        html! {
            p.hint { "Every switch goes through the interlocks (mutex groups, minimum off-time, maximum on-time, the emergency stop); a refusal says why. “Hold to run” keeps a relay on only while the button is held." }
            @if s.slaves.is_empty() { p { "No slave has reported its relays yet." } }
            @for slave in &s.slaves {
                section.slave {
                    h2 { (slave.master) " · " (slave.slave_mac) }
                    table.relays {
                        thead { tr { th scope="col" { "Relay" } th scope="col" { "State" } th scope="col" { "Switch" } th scope="col" { "Hold to run" } } }
                        tbody {
                            @for (i, on) in slave.states.iter().enumerate() {
                                tr {
                                    th scope="row" { (i) }
                                    td { (relay_badge(&slave.master, &slave.slave_mac, i as u8, *on)) }
                                    td {
                                        form.switch method="post" action="/console/switch" data-js {
                                            (form_fields(csrf, Page::Relays))
                                            input type="hidden" name="master" value=(slave.master);
                                            input type="hidden" name="slave" value=(slave.slave_mac);
                                            input type="hidden" name="relay" value=(i);
                                            label { span.sr { "Seconds for relay " (i) } input.secs type="number" name="seconds" min="0" max="86400" value="60" inputmode="numeric"; " s" }
                                            button type="submit" name="action" value="on" data-testid={"on-" (i)} { "On" }
                                            button type="submit" name="action" value="off" data-testid={"off-" (i)} { "Off" }
                                        }
                                    }
                                    td {
                                        button.hold type="button" data-master=(slave.master) data-slave=(slave.slave_mac) data-relay-number=(i) data-testid={"hold-" (i)} { "Hold" }
                                    }
                                }
                            }
                        }
                    }
                    form.together method="post" action="/console/switch" data-js {
                        (form_fields(csrf, Page::Relays))
                        input type="hidden" name="master" value=(slave.master);
                        input type="hidden" name="slave" value=(slave.slave_mac);
                        fieldset {
                            legend { "Switch several relays on together" }
                            @for i in 0..slave.states.len() {
                                label.check { input type="checkbox" name="relay" value=(i) data-testid={"together-" (i)}; " " (i) }
                            }
                            label { "for " input.secs type="number" name="seconds" min="0" max="86400" value="60" inputmode="numeric"; " s" }
                            button type="submit" name="action" value="on" data-testid="together-on" { "On together" }
                        }
                    }
                }
            }
        }
    })
    .await
}

pub(crate) async fn rules(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: PageParams,
) -> Response {
    if session_of(&shared, &headers).is_none() {
        return Redirect::to("/console/signin").into_response();
    }
    let data = shared
        .store
        .call(|s| Ok((s.all_rules()?, s.rule_errors()?)))
        .await;
    let (rules, errors) = match data {
        Ok(d) => d,
        Err(e) => return store_unavailable(&e),
    };
    let firings = shared
        .journal
        .lock()
        .map(|j| j.firings(None, 200))
        .unwrap_or_default();
    let hours = q.hours.unwrap_or(24).clamp(1, REPLAY_HOURS_MAX);
    // The replay `rules test` does, over this agent's own history (read-only, off the
    // runtime's threads).
    let replay = match q
        .test
        .as_deref()
        .and_then(|t| rules.iter().find(|r| r.id == t))
    {
        None => None,
        Some(rule) => {
            let config = shared.config.clone();
            let id = rule.id.clone();
            let rule_id = rule.rule_id.clone();
            let until = now_ms();
            let since = until - i64::from(hours) * 3_600_000;
            let out = tokio::task::spawn_blocking(move || {
                crate::cli::rules_test(&config, &crate::cli::RuleUnderTest::Named(id), since, until)
            })
            .await;
            let text = match out {
                Ok(Ok(text)) => text,
                Ok(Err(e)) => format!("the replay failed: {e:#}"),
                Err(_) => "the replay failed".into(),
            };
            Some((rule_id, text))
        }
    };
    page(&shared, &headers, Page::Rules, "Rules", q.notice.as_deref(), |_, _| {
        html! {
            @if rules.iter().all(|r| r.deleted) { p { "The mirror holds no rules." } }
            @if let Some((rule_id, text)) = &replay {
                section.replay #replay {
                    h2 { "Replay of " (rule_id) " over the last " (hours) " h" }
                    pre { (text) }
                }
            }
            @for r in rules.iter().filter(|r| !r.deleted) {
                section.rule data-rule=(r.rule_id) {
                    h2 { (r.rule_id) @if let Some(n) = &r.rule_name { " · " (n) } }
                    dl.facts {
                        dt { "Device" } dd { (r.device_id) }
                        dt { "Enabled" } dd { @if r.enabled { "yes" } @else { "no" } }
                        dt { "Priority" } dd { (r.priority) }
                        dt { "Cooldown" } dd { (r.cooldown_seconds) " s" }
                        dt { "Last error" } dd .bad[errors.contains_key(&r.id)] { (errors.get(&r.id).map(String::as_str).unwrap_or("none")) }
                    }
                    h3 { "Last firings" }
                    @let mine: Vec<_> = firings.iter().filter(|f| f.rule_id == r.rule_id && f.device == r.device_id).take(5).collect();
                    @if mine.is_empty() { p.hint { "None since the agent started." } }
                    ol.firings {
                        @for f in mine {
                            li { time { (time_text(f.at_ms)) } " " strong { (f.result) } ": " span.explanation { (f.explanation) } }
                        }
                    }
                    form.test method="get" action="/console/rules" {
                        input type="hidden" name="test" value=(r.id);
                        label { "Test over the last " input.secs type="number" name="hours" min="1" max=(REPLAY_HOURS_MAX) value=(hours) inputmode="numeric"; " hours" }
                        button type="submit" { "Test this rule" }
                    }
                }
            }
        }
    })
    .await
}

pub(crate) async fn telemetry(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: PageParams,
) -> Response {
    if session_of(&shared, &headers).is_none() {
        return Redirect::to("/console/signin").into_response();
    }
    let now = now_ms();
    let (hour_from, day_from) = (now - 3_600_000, now - 86_400_000);
    let charts = shared
        .store
        .call(move |s| {
            let mut out = Vec::new();
            for (device, sensor) in s.sensors_since(day_from)? {
                let day = s.rollups_between(&device, Some(&sensor), day_from, now)?;
                out.push((device, sensor, day));
            }
            Ok(out)
        })
        .await;
    let charts = match charts {
        Ok(c) => c,
        Err(e) => return store_unavailable(&e),
    };
    page(&shared, &headers, Page::Telemetry, "Telemetry", q.notice.as_deref(), |_, _| {
        html! {
            p.hint { "From the Pi's own history: the band is each bucket's minimum to maximum, the line its average (one-minute buckets over the hour, five-minute over the day)." }
            @if charts.is_empty() { p { "No readings in the last day." } }
            @for (device, sensor, day) in &charts {
                section.sensor {
                    h2 { (device) " · " (sensor) }
                    @let last = day.last().map(|r| r.last);
                    p { "Latest: " strong { (last.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into())) } }
                    div.charts {
                        @for (caption, from, buckets) in [("Last hour", hour_from, 60), ("Last day", day_from, chart::BUCKETS_MAX)] {
                            @let series = chart::downsample(day, from, now, buckets);
                            figure {
                                figcaption { (caption) @if let Some((lo, hi)) = chart::range(&series) { " · " (format!("{lo:.2} – {hi:.2}")) } }
                                @if series.is_empty() { p.hint { "No readings." } }
                                @else { (PreEscaped(chart::svg(&series, from, now, &format!("{sensor}, {}", caption.to_lowercase())))) }
                            }
                        }
                    }
                }
            }
        }
    })
    .await
}

pub(crate) async fn macros(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: PageParams,
) -> Response {
    if session_of(&shared, &headers).is_none() {
        return Redirect::to("/console/signin").into_response();
    }
    let rows = shared.store.call(|s| s.macros()).await.unwrap_or_default();
    page(&shared, &headers, Page::Macros, "Macros", q.notice.as_deref(), |s, active| {
        let csrf = active.csrf.as_str();
        html! {
            @if rows.is_empty() { p { "The mirror holds no macros." } }
            @for m in &rows {
                @let id = m["id"].as_str().unwrap_or("?");
                @let running = s.macros_running.iter().find(|(r, _)| r == id);
                section.macro {
                    h2 { (m["name"].as_str().unwrap_or(id)) }
                    p { "Id " code { (id) } " · " @if m["enabled"].as_bool() == Some(false) { "disabled" } @else { "enabled" }
                        " · " (m["macro_actions"].as_array().map(Vec::len).unwrap_or(0)) " steps · "
                        span data-live={"macro:" (id)} { @match running { Some((_, n)) => { "running, step " (n + 1) }, None => { "idle" } } } }
                    form method="post" action="/console/macros/run" data-js {
                        (form_fields(csrf, Page::Macros))
                        input type="hidden" name="id" value=(id);
                        button type="submit" { "Run" }
                    }
                    form method="post" action="/console/macros/cancel" data-js {
                        (form_fields(csrf, Page::Macros))
                        input type="hidden" name="id" value=(id);
                        button type="submit" { "Cancel" }
                    }
                }
            }
        }
    })
    .await
}

pub(crate) async fn events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: PageParams,
) -> Response {
    let severity = q.severity.as_deref().filter(|s| !s.is_empty());
    let device = q.device.as_deref().filter(|d| !d.is_empty());
    let list = shared
        .journal
        .lock()
        .map(|j| j.events(severity, device))
        .unwrap_or_default();
    page(&shared, &headers, Page::Events, "Events", q.notice.as_deref(), |s, _| {
        html! {
            form.filter method="get" action="/console/events" {
                label { "Severity " select name="severity" {
                    option value="" { "any" }
                    @for level in ["info", "warning", "error", "critical"] {
                        option value=(level) selected[severity == Some(level)] { (level) }
                    }
                } }
                label { "Device " select name="device" {
                    option value="" { "any" }
                    @for d in &s.devices {
                        option value=(d.device_id) selected[device == Some(d.device_id.as_str())] { (d.device_id) }
                    }
                } }
                button type="submit" { "Filter" }
            }
            p.hint { "Events since the agent started (the newest " (super::journal::EVENTS_MAX) "); the cloud keeps them all." }
            @if list.is_empty() { p { "No events." } }
            ol.events {
                @for e in &list {
                    li data-severity=(e.severity) {
                        time { (time_text(e.at_ms)) } " "
                        span.sev { (e.severity) } " "
                        @if let Some(d) = &e.device { span.dev { (d) } " " }
                        (e.message)
                    }
                }
            }
        }
    })
    .await
}
