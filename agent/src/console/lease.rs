//! Hold-to-run from the console: the relay is on while the page keeps sending keep-alives.
//! The press goes through the interlocks as a hold (its On carries the hold's maximum as its
//! duration, so the slave switches off by itself if the Pi dies); the agent keeps a short lease
//! that each keep-alive extends. Release, or a page that stops sending (closed, network gone),
//! lets the lease lapse and the agent releases the hold: off within [`LEASE`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use tokio::time::Instant;

use super::{Outcome, ask, operator_form, relay_of};
use crate::automation::task::AutomationInput;
use crate::safety::RelayRef;
use crate::shared::Shared;

/// How long a hold lasts without a keep-alive; the page sends one every quarter of it.
pub const LEASE: Duration = Duration::from_millis(1_000);
/// A hold's maximum when the page asks for none: the slave's own off-deadline.
pub const HOLD_SECONDS_DEFAULT: u32 = 60;

/// The lease deadline of each relay held from the console.
#[derive(Debug, Default)]
pub struct Leases(Mutex<BTreeMap<RelayRef, Instant>>);

impl Leases {
    fn start(&self, relay: &RelayRef, now: Instant) {
        if let Ok(mut l) = self.0.lock() {
            l.insert(relay.clone(), now + LEASE);
        }
    }

    /// Extends a lease that is still running; false if there is none (released or lapsed).
    fn extend(&self, relay: &RelayRef, now: Instant) -> bool {
        let Ok(mut l) = self.0.lock() else {
            return false;
        };
        match l.get_mut(relay) {
            Some(deadline) if *deadline > now => {
                *deadline = now + LEASE;
                true
            }
            _ => false,
        }
    }

    fn end(&self, relay: &RelayRef) -> bool {
        self.0
            .lock()
            .map(|mut l| l.remove(relay).is_some())
            .unwrap_or(false)
    }

    /// The lease's deadline, if it runs.
    fn deadline(&self, relay: &RelayRef) -> Option<Instant> {
        self.0.lock().ok()?.get(relay).copied()
    }

    /// Relays held from the console now.
    pub fn held(&self) -> Vec<RelayRef> {
        self.0
            .lock()
            .map(|l| l.keys().cloned().collect())
            .unwrap_or_default()
    }
}

pub(crate) async fn hold(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match operator_form(&shared, &headers, body).await {
        Ok(f) => f,
        Err((o, f)) => return o.respond(&headers, &f),
    };
    let relay = match relay_of(&form) {
        Ok(r) => r,
        Err(o) => return o.respond(&headers, &form),
    };
    let max_seconds = match form.get("max_seconds").map(str::parse::<u32>) {
        None => HOLD_SECONDS_DEFAULT,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return Outcome::refused(StatusCode::BAD_REQUEST, "max_seconds must be a number")
                .respond(&headers, &form);
        }
    };
    let press = ask(&shared, |reply| AutomationInput::Press {
        relay: relay.clone(),
        max_seconds,
        by: "console operator".into(),
        reply,
    })
    .await;
    match press {
        Ok(Ok(())) => {
            shared.console.leases.start(&relay, Instant::now());
            tokio::spawn(watch(shared.clone(), relay.clone()));
            Outcome::ok(format!("{relay} on while held (at most {max_seconds} s)"))
        }
        Ok(Err(reason)) => Outcome::refused(StatusCode::CONFLICT, format!("refused: {reason}")),
        Err(o) => o,
    }
    .respond(&headers, &form)
}

/// Releases the hold once its lease lapses (no keep-alive within [`LEASE`]).
async fn watch(shared: Arc<Shared>, relay: RelayRef) {
    while let Some(deadline) = shared.console.leases.deadline(&relay) {
        if Instant::now() >= deadline {
            shared.console.leases.end(&relay);
            tracing::warn!(%relay, "console hold lapsed (no keep-alive): releasing");
            let _ = ask(&shared, |reply| AutomationInput::Release {
                relay: relay.clone(),
                reply,
            })
            .await;
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

pub(crate) async fn keepalive(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match operator_form(&shared, &headers, body).await {
        Ok(f) => f,
        Err((o, f)) => return o.respond(&headers, &f),
    };
    match relay_of(&form) {
        Ok(relay) if shared.console.leases.extend(&relay, Instant::now()) => Outcome::ok("held"),
        Ok(relay) => Outcome::refused(
            StatusCode::CONFLICT,
            format!("{relay} is no longer held: press again"),
        ),
        Err(o) => o,
    }
    .respond(&headers, &form)
}

pub(crate) async fn release(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match operator_form(&shared, &headers, body).await {
        Ok(f) => f,
        Err((o, f)) => return o.respond(&headers, &f),
    };
    let relay = match relay_of(&form) {
        Ok(r) => r,
        Err(o) => return o.respond(&headers, &form),
    };
    shared.console.leases.end(&relay);
    match ask(&shared, |reply| AutomationInput::Release {
        relay: relay.clone(),
        reply,
    })
    .await
    {
        Ok(Ok(())) => Outcome::ok(format!("{relay} released: off")),
        Ok(Err(reason)) => Outcome::refused(StatusCode::CONFLICT, reason),
        Err(o) => o,
    }
    .respond(&headers, &form)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_extended_only_while_it_runs() {
        let leases = Leases::default();
        let relay = RelayRef::new("M", "14:33:5C:38:BF:60", 1);
        let t0 = Instant::now();
        assert!(!leases.extend(&relay, t0), "never started");
        leases.start(&relay, t0);
        assert!(leases.extend(&relay, t0 + LEASE / 2));
        assert_eq!(leases.deadline(&relay), Some(t0 + LEASE / 2 + LEASE));
        assert!(
            !leases.extend(&relay, t0 + 3 * LEASE),
            "lapsed: a late keep-alive does not revive it"
        );
        assert!(leases.end(&relay));
        assert!(leases.held().is_empty());
    }
}
