//! One evaluation of a condition tree in three-valued logic, updating the rule's timers and
//! hysteresis arming, and collecting why the result holds and when it may next change.

use std::collections::HashMap;

use jiff::tz::TimeZone;

use super::compile::{Node, NodeKind};
use super::engine::FiringReading;
use super::model::Operator;
use super::state::RuleState;
use super::window;

/// A schedule occurrence missed by more than this (agent down, emergency stop) is skipped
/// rather than run late.
pub const SCHEDULE_GRACE_MS: i64 = 60_000;

/// Three-valued truth: a stale or missing reading makes a comparison unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    True,
    False,
    Unknown,
}

impl From<bool> for Tri {
    fn from(b: bool) -> Tri {
        if b { Tri::True } else { Tri::False }
    }
}

/// The latest value of one sensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latest {
    pub value: f64,
    pub at_ms: i64,
}

/// Everything one evaluation reads and writes.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The rule's device's latest readings, by sensor.
    pub latest: Option<&'a HashMap<String, Latest>>,
    pub now_ms: i64,
    pub stale_after_ms: i64,
    pub tz: &'a TimeZone,
    pub state: &'a mut RuleState,
    /// Hysteresis nodes that were true (disarmed if the rule fires).
    pub hysteresis_true: Vec<String>,
    /// Earliest time after now at which the result may change without a reading.
    pub due_ms: Option<i64>,
    /// Earliest time a reading used here turns stale (matters while a held-for runs).
    pub stale_edge_ms: Option<i64>,
}

/// A node's value with what explains it.
#[derive(Debug)]
pub struct Outcome {
    pub tri: Tri,
    pub why: Vec<String>,
    pub readings: Vec<FiringReading>,
}

impl Outcome {
    fn leaf(tri: Tri, why: String, readings: Vec<FiringReading>) -> Outcome {
        Outcome {
            tri,
            why: vec![why],
            readings,
        }
    }

    fn merge<'a>(tri: Tri, parts: impl Iterator<Item = &'a Outcome>) -> Outcome {
        let mut out = Outcome {
            tri,
            why: Vec::new(),
            readings: Vec::new(),
        };
        for p in parts {
            out.why.extend(p.why.iter().cloned());
            out.readings.extend(p.readings.iter().cloned());
        }
        out
    }
}

fn earliest(slot: &mut Option<i64>, t: i64) {
    if slot.is_none_or(|s| t < s) {
        *slot = Some(t);
    }
}

impl Ctx<'_> {
    fn deadline(&mut self, t: i64) {
        if t > self.now_ms {
            earliest(&mut self.due_ms, t);
        }
    }

    fn fresh(&mut self, sensor: &str) -> Option<Latest> {
        let l = *self.latest?.get(sensor)?;
        let edge = l
            .at_ms
            .saturating_add(self.stale_after_ms)
            .saturating_add(1);
        if self.now_ms >= edge {
            return None;
        }
        earliest(&mut self.stale_edge_ms, edge);
        Some(l)
    }
}

fn reading(sensor: &str, l: Latest) -> FiringReading {
    FiringReading {
        sensor: sensor.to_owned(),
        value: l.value,
        recorded_at_ms: l.at_ms,
    }
}

/// Whether a disarmed hysteresis node re-arms: the value passed the threshold by `h` the
/// other way.
fn rearms(op: Operator, value: f64, threshold: f64, h: f64) -> bool {
    match op {
        Operator::Lt | Operator::Le => value >= threshold + h,
        Operator::Gt | Operator::Ge => value <= threshold - h,
        Operator::Eq | Operator::Ne => {
            (value - threshold).abs() >= h && !op.apply(value, threshold)
        }
    }
}

/// Evaluates every node (no short-circuit: timers and arming below must see each evaluation).
pub fn eval(node: &Node, ctx: &mut Ctx<'_>) -> Outcome {
    let mut out = match &node.kind {
        NodeKind::Compare {
            sensor,
            op,
            value,
            hysteresis,
        } => match ctx.fresh(sensor) {
            None => Outcome::leaf(Tri::Unknown, format!("{sensor} unknown"), Vec::new()),
            Some(l) => {
                let mut truth = op.apply(l.value, *value);
                if let Some(h) = hysteresis {
                    if !ctx.state.is_armed(&node.path) {
                        if rearms(*op, l.value, *value, *h) {
                            ctx.state.armed.remove(&node.path);
                        } else {
                            truth = false;
                        }
                    }
                    if truth {
                        ctx.hysteresis_true.push(node.path.clone());
                    }
                }
                let why = format!("{sensor} {} {} {value}", l.value, op.as_str());
                Outcome::leaf(truth.into(), why, vec![reading(sensor, l)])
            }
        },
        NodeKind::Compare2 {
            sensor,
            op,
            other,
            offset,
        } => match (ctx.fresh(sensor), ctx.fresh(other)) {
            (Some(a), Some(b)) => {
                let truth = op.apply(a.value, b.value + offset);
                let plus = if *offset == 0.0 {
                    String::new()
                } else {
                    format!(" + {offset}")
                };
                let why = format!(
                    "{sensor} {} {} {other} {}{plus}",
                    a.value,
                    op.as_str(),
                    b.value
                );
                Outcome::leaf(
                    truth.into(),
                    why,
                    vec![reading(sensor, a), reading(other, b)],
                )
            }
            _ => Outcome::leaf(
                Tri::Unknown,
                format!("{sensor} or {other} unknown"),
                Vec::new(),
            ),
        },
        NodeKind::All(children) => {
            let outs: Vec<Outcome> = children.iter().map(|c| eval(c, ctx)).collect();
            let tri = if outs.iter().any(|o| o.tri == Tri::False) {
                Tri::False
            } else if outs.iter().any(|o| o.tri == Tri::Unknown) {
                Tri::Unknown
            } else {
                Tri::True
            };
            let pick = if tri == Tri::True { None } else { Some(tri) };
            Outcome::merge(tri, outs.iter().filter(|o| pick.is_none_or(|t| o.tri == t)))
        }
        NodeKind::Any(children) => {
            let outs: Vec<Outcome> = children.iter().map(|c| eval(c, ctx)).collect();
            let tri = if outs.iter().any(|o| o.tri == Tri::True) {
                Tri::True
            } else if outs.iter().any(|o| o.tri == Tri::Unknown) {
                Tri::Unknown
            } else {
                Tri::False
            };
            let pick = if tri == Tri::False { None } else { Some(tri) };
            Outcome::merge(tri, outs.iter().filter(|o| pick.is_none_or(|t| o.tri == t)))
        }
        NodeKind::Not(child) => {
            let mut o = eval(child, ctx);
            o.tri = match o.tri {
                Tri::True => Tri::False,
                Tri::False => Tri::True,
                Tri::Unknown => Tri::Unknown,
            };
            o.why = vec![format!("not ({})", o.why.join(" and "))];
            o
        }
        NodeKind::Window {
            from_min,
            to_min,
            days,
        } => {
            let inside = window::in_window(ctx.now_ms, ctx.tz, *from_min, *to_min, days.as_ref());
            if let Some(edge) = window::next_edge(ctx.now_ms, ctx.tz, *from_min, *to_min) {
                ctx.deadline(edge);
            }
            let why = format!(
                "time {}in {:02}:{:02}-{:02}:{:02}",
                if inside { "" } else { "not " },
                from_min / 60,
                from_min % 60,
                to_min / 60,
                to_min % 60
            );
            Outcome::leaf(inside.into(), why, Vec::new())
        }
        NodeKind::Schedule(cron) => {
            let now = ctx.now_ms;
            let truth = match ctx.state.schedule_last_ms.get(&node.path).copied() {
                // First sight: occurrences count from now on.
                None => {
                    ctx.state.schedule_last_ms.insert(node.path.clone(), now);
                    false
                }
                Some(last) => match cron.next_after(last.min(now), ctx.tz) {
                    Some(occurrence) if occurrence <= now => {
                        // Consumed whether or not the rule fires: edge-triggered.
                        ctx.state.schedule_last_ms.insert(node.path.clone(), now);
                        now.saturating_sub(occurrence) <= SCHEDULE_GRACE_MS
                    }
                    _ => false,
                },
            };
            if let Some(next) = cron.next_after(now, ctx.tz) {
                ctx.deadline(next);
            }
            Outcome::leaf(
                truth.into(),
                format!("schedule {}", cron.as_str()),
                Vec::new(),
            )
        }
    };

    if let Some(hold_ms) = node.held_for_ms {
        if out.tri == Tri::True {
            let now = ctx.now_ms;
            let since = (*ctx
                .state
                .held_since_ms
                .entry(node.path.clone())
                .or_insert(now))
            .min(now);
            let held = now.saturating_sub(since);
            let what = out.why.join(" and ");
            if held >= hold_ms {
                out.why = vec![format!("{what} held {} s", held / 1000)];
            } else {
                out.tri = Tri::False;
                out.why = vec![format!(
                    "{what} for {} of {} s",
                    held / 1000,
                    hold_ms / 1000
                )];
                ctx.deadline(since.saturating_add(hold_ms));
            }
        } else {
            ctx.state.held_since_ms.remove(&node.path);
        }
    }
    out
}
