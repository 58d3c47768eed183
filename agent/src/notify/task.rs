//! The thin tokio task around [`Notifier`]: turns the store's inbox into deliveries and sends
//! them with reqwest, retrying with backoff, whether or not the backend is reachable.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::{
    DELIVERY_HEADER, Notifier, NotifySection, SIGNATURE_HEADER, TELEGRAM, TIMESTAMP_HEADER,
    Verdict, signature, telegram_request, verdict,
};
use crate::metrics::Metrics;
use crate::store::{NotificationRow, StoreHandle};

/// Inbox rows routed per store call.
pub const INBOX_BATCH_ROWS_MAX: usize = 100;
/// Deliveries sent per round.
pub const SEND_BATCH_ROWS_MAX: usize = 50;
/// Deliveries kept waiting at most; beyond it the oldest are dropped (counted).
pub const NOTIFICATIONS_ROWS_MAX: u64 = 10_000;
/// A delivery still failing after this long is dropped (counted): old news is noise.
pub const NOTIFICATION_AGE_MAX_MS: i64 = 24 * 3_600_000;
/// How often the inbox is looked at; causes are on disk already, so this is only latency.
pub const INBOX_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// First and longest wait between attempts of one delivery.
pub const RETRY_DELAY_MIN: Duration = Duration::from_millis(500);
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(300);
/// A target's answer body read for the log, at most.
pub const ERROR_TEXT_BYTES_MAX: usize = 200;

/// Runs until `cancel`: routes the inbox and sends what is due.
pub async fn run(
    agent_id: String,
    section: NotifySection,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut notifier = Notifier::new(&agent_id, &section);
    let http = match reqwest011::Client::builder()
        .timeout(Duration::from_millis(section.request_timeout_ms))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            error!(error = %e, "notifications: cannot build the HTTP client; none will be sent");
            return;
        }
    };
    loop {
        route(&mut notifier, &store, &metrics).await;
        send_due(&section, &http, &store, &metrics).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(INBOX_POLL_INTERVAL) => {}
        }
    }
}

async fn route(notifier: &mut Notifier, store: &StoreHandle, metrics: &Metrics) {
    loop {
        let events = match store.call(|s| s.notify_inbox(INBOX_BATCH_ROWS_MAX)).await {
            Ok(events) => events,
            Err(e) => {
                error!(error = %e, "notifications: cannot read the inbox");
                return;
            }
        };
        let Some(last) = events.last().map(|e| e.seq) else {
            return;
        };
        let now = crate::shared::now_ms();
        let mut deliveries = Vec::new();
        for event in &events {
            let kind = super::Kind::of_event(&event.event_type);
            let before = kind.map_or(0, |k| notifier.suppressed(k));
            let made = notifier.on_event(event, now);
            if let Some(kind) = kind
                && notifier.suppressed(kind) > before
            {
                metrics
                    .notifications
                    .get_or_create(&labels(kind.as_str(), "-", "rate_limited"))
                    .inc();
            }
            deliveries.extend(made);
        }
        let full = events.len() == INBOX_BATCH_ROWS_MAX;
        match store
            .call(move |s| s.notify_route(last, &deliveries, NOTIFICATIONS_ROWS_MAX, now))
            .await
        {
            Ok(dropped) => {
                for (target, kind) in dropped {
                    warn!(target, kind, "notifications: queue full; oldest dropped");
                    metrics
                        .notifications
                        .get_or_create(&labels(&kind, &target, "dropped"))
                        .inc();
                }
            }
            Err(e) => {
                error!(error = %e, "notifications: cannot queue deliveries");
                return;
            }
        }
        if !full {
            return;
        }
    }
}

async fn send_due(
    section: &NotifySection,
    http: &reqwest011::Client,
    store: &StoreHandle,
    metrics: &Metrics,
) {
    let now = crate::shared::now_ms();
    let due = match store
        .call(move |s| s.notifications_due(now, SEND_BATCH_ROWS_MAX))
        .await
    {
        Ok(due) => due,
        Err(e) => {
            error!(error = %e, "notifications: cannot read the queue");
            return;
        }
    };
    for row in due {
        let seq = row.seq;
        if now - row.created_at_ms > NOTIFICATION_AGE_MAX_MS {
            warn!(
                target = row.target,
                kind = row.kind,
                "notification too old; dropped"
            );
            count(metrics, &row, "dropped");
            let _ = store.call(move |s| s.notification_done(seq)).await;
            continue;
        }
        let (status, error_text) = match send(section, http, &row).await {
            Ok(status) => (Some(status), format!("HTTP {status}")),
            Err(SendError::Unknown) => {
                // The target left the configuration: nobody to send it to.
                warn!(
                    target = row.target,
                    "notification for a target no longer configured; dropped"
                );
                count(metrics, &row, "dropped");
                let _ = store.call(move |s| s.notification_done(seq)).await;
                continue;
            }
            Err(SendError::Http(e)) => (None, e),
        };
        match verdict(status) {
            Verdict::Delivered => {
                debug!(target = row.target, kind = row.kind, "notification sent");
                count(metrics, &row, "sent");
                let _ = store.call(move |s| s.notification_done(seq)).await;
            }
            Verdict::GiveUp => {
                error!(target = row.target, kind = row.kind, error = %error_text,
                       "notification refused for good; given up");
                count(metrics, &row, "failed");
                let _ = store.call(move |s| s.notification_done(seq)).await;
            }
            Verdict::Retry => {
                let delay = backon::ExponentialBuilder::default()
                    .with_min_delay(RETRY_DELAY_MIN)
                    .with_max_delay(RETRY_DELAY_MAX)
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times()
                    .build()
                    .nth((row.attempts as usize).min(32))
                    .unwrap_or(RETRY_DELAY_MAX);
                debug!(target = row.target, error = %error_text, delay_ms = delay.as_millis() as u64,
                       "notification not delivered; retrying");
                count(metrics, &row, "retried");
                let next = now + delay.as_millis() as i64;
                let _ = store
                    .call(move |s| s.notification_retry_later(seq, &error_text, next))
                    .await;
            }
        }
    }
}

enum SendError {
    Unknown,
    Http(String),
}

async fn send(
    section: &NotifySection,
    http: &reqwest011::Client,
    row: &NotificationRow,
) -> Result<u16, SendError> {
    let request = if row.target == TELEGRAM {
        let (Some(token), Some(chat)) = (&section.telegram_bot_token, &section.telegram_chat_id)
        else {
            return Err(SendError::Unknown);
        };
        let (url, body) =
            telegram_request(&section.telegram_api_base, token.expose(), chat, &row.text);
        http.post(url).json(&body)
    } else {
        let name = row.target.strip_prefix("webhook:").unwrap_or_default();
        let Some(hook) = section.webhooks.iter().find(|h| h.name == name) else {
            return Err(SendError::Unknown);
        };
        // Signed at each attempt: the timestamp says when this copy was sent.
        let timestamp = crate::shared::now_ms() / 1000;
        let body = row.body.clone().into_bytes();
        http.post(&hook.url)
            .header("Content-Type", "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                SIGNATURE_HEADER,
                signature(hook.secret.expose().as_bytes(), timestamp, &body),
            )
            .header(DELIVERY_HEADER, &row.delivery_id)
            .body(body)
    };
    match request.send().await {
        Ok(response) => Ok(response.status().as_u16()),
        // Never the URL: a Telegram URL holds the bot token.
        Err(e) => Err(SendError::Http(
            describe(&e).chars().take(ERROR_TEXT_BYTES_MAX).collect(),
        )),
    }
}

fn describe(e: &reqwest011::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    what.to_string()
}

fn labels(kind: &str, target: &str, outcome: &str) -> Vec<(String, String)> {
    vec![
        ("kind".to_string(), kind.to_string()),
        ("target".to_string(), target.to_string()),
        ("outcome".to_string(), outcome.to_string()),
    ]
}

fn count(metrics: &Metrics, row: &NotificationRow, outcome: &str) {
    metrics
        .notifications
        .get_or_create(&labels(&row.kind, &row.target, outcome))
        .inc();
}
