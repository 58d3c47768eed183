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
    /// Each node's truth in preorder, before and after its held-for (a reused buffer, cleared
    /// by the caller): `explain` re-walks it to build a firing's explanation.
    pub trace: &'a mut Vec<(Tri, Tri)>,
    /// Earliest time after now at which the result may change without a reading.
    pub due_ms: Option<i64>,
    /// Earliest time a reading used here turns stale (matters while a held-for runs).
    pub stale_edge_ms: Option<i64>,
    /// Whether the evaluation changed `state`.
    pub changed: bool,
}

/// A node's value with what explains it (built only for a firing).
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

    fn merge(tri: Tri, parts: impl Iterator<Item = Outcome>) -> Outcome {
        let mut out = Outcome {
            tri,
            why: Vec::new(),
            readings: Vec::new(),
        };
        for p in parts {
            out.why.extend(p.why);
            out.readings.extend(p.readings);
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

fn not(tri: Tri) -> Tri {
    match tri {
        Tri::True => Tri::False,
        Tri::False => Tri::True,
        Tri::Unknown => Tri::Unknown,
    }
}

/// Evaluates every node (no short-circuit: timers and arming below must see each evaluation),
/// recording each node's truth in `ctx.trace`. Allocates nothing unless the state changes.
pub fn eval(node: &Node, ctx: &mut Ctx<'_>) -> Tri {
    let slot = ctx.trace.len();
    ctx.trace.push((Tri::Unknown, Tri::Unknown));
    let inner = match &node.kind {
        NodeKind::Compare {
            sensor,
            op,
            value,
            hysteresis,
        } => match ctx.fresh(sensor) {
            None => Tri::Unknown,
            Some(l) => {
                let mut truth = op.apply(l.value, *value);
                if let Some(h) = hysteresis {
                    if !ctx.state.is_armed(&node.path) {
                        if rearms(*op, l.value, *value, *h) {
                            ctx.changed |= ctx.state.armed.remove(&node.path).is_some();
                        } else {
                            truth = false;
                        }
                    }
                }
                truth.into()
            }
        },
        NodeKind::Compare2 {
            sensor,
            op,
            other,
            offset,
        } => match (ctx.fresh(sensor), ctx.fresh(other)) {
            (Some(a), Some(b)) => op.apply(a.value, b.value + offset).into(),
            _ => Tri::Unknown,
        },
        NodeKind::All(children) => {
            let (mut false_, mut unknown) = (false, false);
            for c in children {
                match eval(c, ctx) {
                    Tri::False => false_ = true,
                    Tri::Unknown => unknown = true,
                    Tri::True => {}
                }
            }
            if false_ {
                Tri::False
            } else if unknown {
                Tri::Unknown
            } else {
                Tri::True
            }
        }
        NodeKind::Any(children) => {
            let (mut true_, mut unknown) = (false, false);
            for c in children {
                match eval(c, ctx) {
                    Tri::True => true_ = true,
                    Tri::Unknown => unknown = true,
                    Tri::False => {}
                }
            }
            if true_ {
                Tri::True
            } else if unknown {
                Tri::Unknown
            } else {
                Tri::False
            }
        }
        NodeKind::Not(child) => not(eval(child, ctx)),
        NodeKind::Window {
            from_min,
            to_min,
            days,
        } => {
            let inside = window::in_window(ctx.now_ms, ctx.tz, *from_min, *to_min, days.as_ref());
            if let Some(edge) = window::next_edge(ctx.now_ms, ctx.tz, *from_min, *to_min) {
                ctx.deadline(edge);
            }
            inside.into()
        }
        NodeKind::Schedule(cron) => {
            let now = ctx.now_ms;
            let truth = match ctx.state.schedule_last_ms.get(&node.path).copied() {
                // First sight: occurrences count from now on.
                None => {
                    ctx.state.schedule_last_ms.insert(node.path.clone(), now);
                    ctx.changed = true;
                    false
                }
                // The wall clock was set back: what ran up to `last` never runs again, so
                // nothing is due until the clock passes it.
                Some(last) if now < last => false,
                Some(last) => match cron.next_after(last, ctx.tz) {
                    Some(first) if first <= now => {
                        // Consumed whether or not the rule fires: edge-triggered. Missed
                        // occurrences run once if the latest is at most the grace late (an
                        // outage, a clock set forward); older ones are skipped, never run late.
                        if let Some(slot) = ctx.state.schedule_last_ms.get_mut(&node.path) {
                            ctx.changed |= *slot != now;
                            *slot = now;
                        }
                        let within_grace = now.saturating_sub(SCHEDULE_GRACE_MS + 1).max(last);
                        cron.next_after(within_grace, ctx.tz)
                            .is_some_and(|latest| latest <= now)
                    }
                    _ => false,
                },
            };
            let last = ctx.state.schedule_last_ms.get(&node.path).copied();
            if let Some(next) = cron.next_after(last.map_or(now, |l| l.max(now)), ctx.tz) {
                ctx.deadline(next);
            }
            truth.into()
        }
    };

    let mut tri = inner;
    if let Some(hold_ms) = node.held_for_ms {
        if inner == Tri::True {
            let now = ctx.now_ms;
            let since = match ctx.state.held_since_ms.get(&node.path) {
                Some(&since) => since,
                None => {
                    ctx.state.held_since_ms.insert(node.path.clone(), now);
                    ctx.changed = true;
                    now
                }
            }
            .min(now);
            if now.saturating_sub(since) < hold_ms {
                tri = Tri::False;
                ctx.deadline(since.saturating_add(hold_ms));
            }
        } else {
            ctx.changed |= ctx.state.held_since_ms.remove(&node.path).is_some();
        }
    }
    ctx.trace[slot] = (inner, tri);
    tri
}

/// What `explain` reads: the evaluation's inputs and the state it left.
#[derive(Debug)]
pub struct Explain<'a> {
    pub latest: Option<&'a HashMap<String, Latest>>,
    pub now_ms: i64,
    pub state: &'a RuleState,
    /// `eval`'s trace of the same node.
    pub trace: &'a [(Tri, Tri)],
}

/// Re-walks an evaluated tree (in `eval`'s order, `pos` from 0) to say why the result holds,
/// and collects the hysteresis nodes that were true (disarmed when the rule fires).
pub fn explain(
    node: &Node,
    x: &Explain<'_>,
    pos: &mut usize,
    hysteresis_true: &mut Vec<String>,
) -> Outcome {
    let (inner, tri) = x
        .trace
        .get(*pos)
        .copied()
        .unwrap_or((Tri::Unknown, Tri::Unknown));
    *pos += 1;
    let latest = |sensor: &str| x.latest.and_then(|l| l.get(sensor)).copied();
    let mut out = match &node.kind {
        NodeKind::Compare {
            sensor,
            op,
            value,
            hysteresis,
        } => match latest(sensor).filter(|_| inner != Tri::Unknown) {
            None => Outcome::leaf(inner, format!("{sensor} unknown"), Vec::new()),
            Some(l) => {
                if hysteresis.is_some() && inner == Tri::True {
                    hysteresis_true.push(node.path.clone());
                }
                let why = format!("{sensor} {} {} {value}", l.value, op.as_str());
                Outcome::leaf(inner, why, vec![reading(sensor, l)])
            }
        },
        NodeKind::Compare2 {
            sensor,
            op,
            other,
            offset,
        } => match (latest(sensor), latest(other)) {
            (Some(a), Some(b)) if inner != Tri::Unknown => {
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
                Outcome::leaf(inner, why, vec![reading(sensor, a), reading(other, b)])
            }
            _ => Outcome::leaf(inner, format!("{sensor} or {other} unknown"), Vec::new()),
        },
        NodeKind::All(children) | NodeKind::Any(children) => {
            let outs: Vec<Outcome> = children
                .iter()
                .map(|c| explain(c, x, pos, hysteresis_true))
                .collect();
            // All explains by its true children when true, else by those that decided it; Any
            // by its false children when false, else likewise.
            let every = if matches!(node.kind, NodeKind::All(_)) {
                Tri::True
            } else {
                Tri::False
            };
            let pick = if inner == every { None } else { Some(inner) };
            Outcome::merge(
                inner,
                outs.into_iter().filter(|o| pick.is_none_or(|t| o.tri == t)),
            )
        }
        NodeKind::Not(child) => {
            let o = explain(child, x, pos, hysteresis_true);
            Outcome {
                tri: inner,
                why: vec![format!("not ({})", o.why.join(" and "))],
                readings: o.readings,
            }
        }
        NodeKind::Window {
            from_min, to_min, ..
        } => {
            let why = format!(
                "time {}in {:02}:{:02}-{:02}:{:02}",
                if inner == Tri::True { "" } else { "not " },
                from_min / 60,
                from_min % 60,
                to_min / 60,
                to_min % 60
            );
            Outcome::leaf(inner, why, Vec::new())
        }
        NodeKind::Schedule(cron) => {
            Outcome::leaf(inner, format!("schedule {}", cron.as_str()), Vec::new())
        }
    };

    if let Some(hold_ms) = node.held_for_ms {
        if inner == Tri::True {
            let since = x
                .state
                .held_since_ms
                .get(&node.path)
                .copied()
                .unwrap_or(x.now_ms)
                .min(x.now_ms);
            let held = x.now_ms.saturating_sub(since);
            let what = out.why.join(" and ");
            out.why = if tri == Tri::True {
                vec![format!("{what} held {} s", held / 1000)]
            } else {
                vec![format!(
                    "{what} for {} of {} s",
                    held / 1000,
                    hold_ms / 1000
                )]
            };
        }
    }
    out.tri = tri;
    out
}
