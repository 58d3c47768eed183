//! Rules that may fight over a relay: one switches it on, another off, and both conditions
//! may hold at once.
//!
//! Each condition is reduced to per-sensor intervals when it is a conjunction (all, nested)
//! of constant comparisons; everything else is "unconstrained", so the analysis only ever
//! errs towards flagging.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::compile::{CompiledRule, Node, NodeKind};
use super::model::{Action, Operator};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contradiction {
    /// rule_id of the rule that switches the relay on.
    pub a: String,
    /// rule_id of the rule that switches it off.
    pub b: String,
    pub device_id: String,
    pub slave_mac_address: String,
    pub relay_number: u8,
    pub reason: String,
}

/// One end of an interval: the value and whether it is included.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bound {
    value: f64,
    inclusive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Interval {
    low: Option<Bound>,
    high: Option<Bound>,
}

impl Interval {
    const ALL: Interval = Interval {
        low: None,
        high: None,
    };

    fn of(op: Operator, v: f64) -> Interval {
        let b = |inclusive| {
            Some(Bound {
                value: v,
                inclusive,
            })
        };
        match op {
            Operator::Lt => Interval {
                low: None,
                high: b(false),
            },
            Operator::Le => Interval {
                low: None,
                high: b(true),
            },
            Operator::Gt => Interval {
                low: b(false),
                high: None,
            },
            Operator::Ge => Interval {
                low: b(true),
                high: None,
            },
            Operator::Eq => Interval {
                low: b(true),
                high: b(true),
            },
            // Two rays; one interval cannot say that, so it constrains nothing.
            Operator::Ne => Interval::ALL,
        }
    }

    fn intersect(self, o: Interval) -> Interval {
        let low = match (self.low, o.low) {
            (Some(a), Some(b)) if a.value > b.value || (a.value == b.value && !a.inclusive) => {
                Some(a)
            }
            (Some(_), Some(b)) => Some(b),
            (a, b) => a.or(b),
        };
        let high = match (self.high, o.high) {
            (Some(a), Some(b)) if a.value < b.value || (a.value == b.value && !a.inclusive) => {
                Some(a)
            }
            (Some(_), Some(b)) => Some(b),
            (a, b) => a.or(b),
        };
        Interval { low, high }
    }

    fn is_empty(self) -> bool {
        match (self.low, self.high) {
            (Some(l), Some(h)) => {
                l.value > h.value || (l.value == h.value && !(l.inclusive && h.inclusive))
            }
            _ => false,
        }
    }

    fn describe(self, sensor: &str) -> String {
        let low = self
            .low
            .map(|b| format!("{} {}", b.value, if b.inclusive { "<=" } else { "<" }));
        let high = self
            .high
            .map(|b| format!("{} {}", if b.inclusive { "<=" } else { "<" }, b.value));
        match (low, high) {
            (Some(l), Some(h)) => format!("{l} {sensor} {h}"),
            (Some(l), None) => format!("{l} {sensor}"),
            (None, Some(h)) => format!("{sensor} {h}"),
            (None, None) => format!("any {sensor}"),
        }
    }
}

/// Per-sensor intervals a condition implies when true. `not` of a single comparison is the
/// negated comparison (a false comparison is a definite reading, so the negation is exact).
fn constraints(node: &Node, out: &mut BTreeMap<String, Interval>) {
    match &node.kind {
        NodeKind::Compare {
            sensor, op, value, ..
        } => {
            let slot = out.entry(sensor.clone()).or_insert(Interval::ALL);
            *slot = slot.intersect(Interval::of(*op, *value));
        }
        NodeKind::All(children) => children.iter().for_each(|c| constraints(c, out)),
        NodeKind::Not(child) => {
            if let NodeKind::Compare {
                sensor, op, value, ..
            } = &child.kind
            {
                let negated = match op {
                    Operator::Lt => Some(Operator::Ge),
                    Operator::Le => Some(Operator::Gt),
                    Operator::Gt => Some(Operator::Le),
                    Operator::Ge => Some(Operator::Lt),
                    Operator::Ne => Some(Operator::Eq),
                    Operator::Eq => None,
                };
                if let Some(op) = negated {
                    let slot = out.entry(sensor.clone()).or_insert(Interval::ALL);
                    *slot = slot.intersect(Interval::of(op, *value));
                }
            }
        }
        // Any, windows, schedules, sensor pairs: undecided, so no constraint.
        _ => {}
    }
}

fn relays(rule: &CompiledRule, on: bool) -> Vec<(String, u8)> {
    rule.actions()
        .iter()
        .filter_map(|a| match a {
            Action::RelayOn {
                slave_mac_address,
                relay_number,
                ..
            } if on => Some((slave_mac_address.to_ascii_uppercase(), *relay_number)),
            Action::RelayOff {
                slave_mac_address,
                relay_number,
            } if !on => Some((slave_mac_address.to_ascii_uppercase(), *relay_number)),
            _ => None,
        })
        .collect()
}

/// Pairs of rules of one device that switch the same relay on and off and whose conditions
/// are not provably disjoint.
pub fn contradictions(rules: &[CompiledRule]) -> Vec<Contradiction> {
    let mut found = Vec::new();
    let shapes: Vec<BTreeMap<String, Interval>> = rules
        .iter()
        .map(|r| {
            let mut m = BTreeMap::new();
            constraints(&r.root, &mut m);
            m
        })
        .collect();
    for (i, a) in rules.iter().enumerate() {
        let ons = relays(a, true);
        if ons.is_empty() {
            continue;
        }
        for (j, b) in rules.iter().enumerate() {
            if i == j || a.device_id != b.device_id {
                continue;
            }
            let offs = relays(b, false);
            for (mac, relay) in ons.iter().filter(|on| offs.contains(on)) {
                let disjoint = shapes[i].iter().any(|(sensor, ia)| {
                    shapes[j]
                        .get(sensor)
                        .is_some_and(|ib| ia.intersect(*ib).is_empty())
                });
                if disjoint {
                    continue;
                }
                let overlap: Vec<String> = shapes[i]
                    .iter()
                    .filter_map(|(s, ia)| shapes[j].get(s).map(|ib| ia.intersect(*ib).describe(s)))
                    .collect();
                let reason = if overlap.is_empty() {
                    format!(
                        "{} switches {mac} relay {relay} on and {} switches it off; their conditions may hold together",
                        a.rule_id, b.rule_id
                    )
                } else {
                    format!(
                        "{} switches {mac} relay {relay} on and {} switches it off; both may hold when {}",
                        a.rule_id,
                        b.rule_id,
                        overlap.join(" and ")
                    )
                };
                found.push(Contradiction {
                    a: a.rule_id.clone(),
                    b: b.rule_id.clone(),
                    device_id: a.device_id.clone(),
                    slave_mac_address: mac.clone(),
                    relay_number: *relay,
                    reason,
                });
            }
        }
    }
    found
}
