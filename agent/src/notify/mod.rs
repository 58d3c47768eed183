//! Notifications from the Pi (webhooks, Telegram): what the agent recorded becomes a message per
//! target, after the per-kind switches and rate limit. Sans-I/O: events and the time come in,
//! deliveries (target, text, signed-as-stored JSON body) come out; `task` does the HTTP.

pub mod task;

use std::collections::{BTreeMap, VecDeque};

use ring::hmac;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{ConfigError, Secret, check_id, check_url, in_range, invalid};

/// The rate limit's window.
pub const RATE_WINDOW_MS: i64 = 60_000;
/// Default notifications per kind per [`RATE_WINDOW_MS`]; the rest are counted and summarised.
pub const RATE_PER_KIND_PER_MINUTE_DEFAULT: u32 = 6;
/// Default time a target has to answer one request.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// A message's text is cut at this many bytes (Telegram takes 4096 characters).
pub const TEXT_BYTES_MAX: usize = 3_500;
/// Webhook targets at most.
pub const WEBHOOKS_MAX: usize = 16;
/// The header naming when a webhook body was signed (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "X-AutoCore-Timestamp";
/// The header carrying `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "X-AutoCore-Signature";
/// The header with the notification's delivery id, the same on every retry (for deduplication).
pub const DELIVERY_HEADER: &str = "X-AutoCore-Delivery";
/// The shortest webhook secret accepted.
pub const SECRET_CHARS_MIN: usize = 16;

/// What a notification is about; each can be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    EmergencyStop,
    EmergencyReset,
    MasterOffline,
    MasterOnline,
    RuleError,
    Outage,
    CommandRefused,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::EmergencyStop,
        Kind::EmergencyReset,
        Kind::MasterOffline,
        Kind::MasterOnline,
        Kind::RuleError,
        Kind::Outage,
        Kind::CommandRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::EmergencyStop => "emergency_stop",
            Kind::EmergencyReset => "emergency_reset",
            Kind::MasterOffline => "master_offline",
            Kind::MasterOnline => "master_online",
            Kind::RuleError => "rule_error",
            Kind::Outage => "outage",
            Kind::CommandRefused => "command_refused",
        }
    }

    /// The kind of an agent event (`event_type`), if it is one that notifies.
    pub fn of_event(event_type: &str) -> Option<Kind> {
        match event_type {
            "backend_outage" => Some(Kind::Outage),
            other => Kind::ALL.into_iter().find(|k| k.as_str() == other),
        }
    }
}

fn all_kinds() -> Vec<Kind> {
    Kind::ALL.to_vec()
}

/// `[notify]`: targets, which kinds, how many per minute.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    /// Kinds that notify at all (each target narrows it further).
    #[serde(default = "all_kinds")]
    pub kinds: Vec<Kind>,
    #[serde(default = "defaults::rate")]
    pub rate_limit_per_kind_per_minute: u32,
    #[serde(default = "defaults::timeout")]
    pub request_timeout_ms: u64,
    #[serde(default)]
    pub telegram_bot_token: Option<Secret>,
    #[serde(default)]
    pub telegram_chat_id: Option<String>,
    #[serde(default = "defaults::telegram_api_base")]
    pub telegram_api_base: String,
    #[serde(default = "all_kinds")]
    pub telegram_kinds: Vec<Kind>,
    #[serde(default)]
    pub webhooks: Vec<WebhookTarget>,
}

impl Default for NotifySection {
    fn default() -> Self {
        NotifySection {
            kinds: all_kinds(),
            rate_limit_per_kind_per_minute: RATE_PER_KIND_PER_MINUTE_DEFAULT,
            request_timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT,
            telegram_bot_token: None,
            telegram_chat_id: None,
            telegram_api_base: defaults::telegram_api_base(),
            telegram_kinds: all_kinds(),
            webhooks: Vec::new(),
        }
    }
}

/// One `[[notify.webhooks]]`: a URL that receives signed JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTarget {
    pub name: String,
    pub url: String,
    pub secret: Secret,
    #[serde(default = "all_kinds")]
    pub kinds: Vec<Kind>,
}

mod defaults {
    pub fn rate() -> u32 {
        super::RATE_PER_KIND_PER_MINUTE_DEFAULT
    }
    pub fn timeout() -> u64 {
        super::REQUEST_TIMEOUT_MS_DEFAULT
    }
    pub fn telegram_api_base() -> String {
        "https://api.telegram.org".to_string()
    }
}

/// The Telegram target's name in the store and the metrics.
pub const TELEGRAM: &str = "telegram";

impl NotifySection {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            "notify.rate_limit_per_kind_per_minute",
            self.rate_limit_per_kind_per_minute.into(),
            1,
            600,
        )?;
        in_range(
            "notify.request_timeout_ms",
            self.request_timeout_ms,
            100,
            120_000,
        )?;
        check_url(
            "notify.telegram_api_base",
            &self.telegram_api_base,
            &["http", "https"],
        )?;
        match (&self.telegram_bot_token, &self.telegram_chat_id) {
            (Some(token), _) if token.expose().is_empty() => {
                return Err(invalid("notify.telegram_bot_token", "must not be empty"));
            }
            (Some(_), None) => {
                return Err(invalid(
                    "notify.telegram_chat_id",
                    "set it with notify.telegram_bot_token",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "notify.telegram_bot_token",
                    "set it with notify.telegram_chat_id",
                ));
            }
            _ => {}
        }
        if self.webhooks.len() > WEBHOOKS_MAX {
            return Err(invalid(
                "notify.webhooks",
                format!("at most {WEBHOOKS_MAX} webhooks"),
            ));
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            check_id(&format!("notify.webhooks[{i}].name"), &hook.name)?;
            if self.webhooks[..i].iter().any(|h| h.name == hook.name) {
                return Err(invalid(
                    format!("notify.webhooks[{i}].name"),
                    format!("{} is listed twice", hook.name),
                ));
            }
            check_url(
                &format!("notify.webhooks[{i}].url"),
                &hook.url,
                &["http", "https"],
            )?;
            if hook.secret.expose().chars().count() < SECRET_CHARS_MIN {
                return Err(invalid(
                    format!("notify.webhooks[{i}].secret"),
                    format!("must be at least {SECRET_CHARS_MIN} characters"),
                ));
            }
        }
        Ok(())
    }

    /// Every target's name with the kinds it takes (already narrowed by `kinds`).
    pub fn targets(&self) -> Vec<(String, Vec<Kind>)> {
        let narrow = |kinds: &[Kind]| -> Vec<Kind> {
            kinds
                .iter()
                .copied()
                .filter(|k| self.kinds.contains(k))
                .collect()
        };
        let mut out = Vec::new();
        if self.telegram_bot_token.is_some() {
            out.push((TELEGRAM.to_string(), narrow(&self.telegram_kinds)));
        }
        for hook in &self.webhooks {
            out.push((format!("webhook:{}", hook.name), narrow(&hook.kinds)));
        }
        out
    }
}

/// Something the agent recorded that may notify (a row of the store's `notify_inbox`).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEvent {
    pub seq: i64,
    pub event_type: String,
    pub severity: String,
    pub message: String,
    pub payload: Value,
    pub occurred_at_ms: i64,
}

/// One message for one target, as the store keeps it until it is delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub target: String,
    pub kind: Kind,
    /// The same on every retry: receivers deduplicate by it.
    pub delivery_id: String,
    pub text: String,
    pub body: Value,
}

/// Turns events into deliveries: switches per kind and per target, and at most `per_minute` of
/// a kind in any sliding minute; the rest are counted and summarised in the next one that goes.
#[derive(Debug)]
pub struct Notifier {
    agent_id: String,
    targets: Vec<(String, Vec<Kind>)>,
    per_minute: usize,
    sent: BTreeMap<Kind, VecDeque<i64>>,
    suppressed: BTreeMap<Kind, u64>,
}

impl Notifier {
    pub fn new(agent_id: &str, section: &NotifySection) -> Notifier {
        Notifier {
            agent_id: agent_id.to_string(),
            targets: section.targets(),
            per_minute: section.rate_limit_per_kind_per_minute.max(1) as usize,
            sent: BTreeMap::new(),
            suppressed: BTreeMap::new(),
        }
    }

    /// Whether any target takes anything: without one, events are only drained.
    pub fn has_targets(&self) -> bool {
        self.targets.iter().any(|(_, kinds)| !kinds.is_empty())
    }

    /// Notifications suppressed by the rate limit and not yet summarised, by kind.
    pub fn suppressed(&self, kind: Kind) -> u64 {
        self.suppressed.get(&kind).copied().unwrap_or(0)
    }

    /// The deliveries `event` makes at `now_ms` (none when switched off or rate limited).
    pub fn on_event(&mut self, event: &AgentEvent, now_ms: i64) -> Vec<Delivery> {
        let Some(kind) = Kind::of_event(&event.event_type) else {
            return Vec::new();
        };
        let targets: Vec<&String> = self
            .targets
            .iter()
            .filter(|(_, kinds)| kinds.contains(&kind))
            .map(|(name, _)| name)
            .collect();
        if targets.is_empty() {
            return Vec::new();
        }
        let window = self.sent.entry(kind).or_default();
        while window
            .front()
            .is_some_and(|t| *t <= now_ms - RATE_WINDOW_MS)
        {
            window.pop_front();
        }
        if window.len() >= self.per_minute {
            *self.suppressed.entry(kind).or_default() += 1;
            return Vec::new();
        }
        window.push_back(now_ms);
        let suppressed = self.suppressed.remove(&kind).unwrap_or(0);
        let mut text = format!(
            "[{}] {}: {}",
            self.agent_id,
            kind.as_str().replace('_', " "),
            event.message
        );
        if suppressed > 0 {
            text.push_str(&format!(
                " (+{suppressed} more {} suppressed by the rate limit)",
                kind.as_str()
            ));
        }
        let text = truncate(&text, TEXT_BYTES_MAX);
        let delivery_id = format!("{}:{}:{}", self.agent_id, event.seq, event.occurred_at_ms);
        let body = json!({
            "delivery_id": delivery_id,
            "agent_id": self.agent_id,
            "kind": kind.as_str(),
            "severity": event.severity,
            "text": text,
            "occurred_at": crate::cloud::format_timestamp_ms(event.occurred_at_ms),
            "details": event.payload,
            "suppressed_before": suppressed,
        });
        targets
            .into_iter()
            .map(|target| Delivery {
                target: target.clone(),
                kind,
                delivery_id: delivery_id.clone(),
                text: text.clone(),
                body: body.clone(),
            })
            .collect()
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// `sha256=<hex>` of HMAC-SHA256 under `secret` over `"<timestamp>.<body>"`: the timestamp is
/// signed with the body, so a receiver that refuses old timestamps refuses replays.
pub fn signature(secret: &[u8], timestamp_s: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(timestamp_s.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// The Telegram Bot API's `sendMessage` URL and body for `text`.
pub fn telegram_request(api_base: &str, token: &str, chat_id: &str, text: &str) -> (String, Value) {
    (
        format!("{}/bot{token}/sendMessage", api_base.trim_end_matches('/')),
        json!({"chat_id": chat_id, "text": text}),
    )
}

/// What to do after an answer (or none): delivered, try again later, or give up for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry,
    GiveUp,
}

/// 2xx delivered; 408, 429 and 5xx (and no answer) retried; any other status given up, since
/// sending the same request again would be refused again.
pub fn verdict(status: Option<u16>) -> Verdict {
    match status {
        Some(s) if (200..300).contains(&s) => Verdict::Delivered,
        Some(408 | 429) | None => Verdict::Retry,
        Some(s) if s >= 500 => Verdict::Retry,
        Some(_) => Verdict::GiveUp,
    }
}

#[cfg(test)]
mod tests;
