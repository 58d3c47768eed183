//! Storms of random requests, time advances, state reports and emergency stops against a model
//! of the physical relays; the safety invariants are checked after every single switch.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const SLAVES: [(&str, &str); 3] = [
    ("m1", "AA:00:00:00:00:01"),
    ("m1", "AA:00:00:00:00:02"),
    ("m2", "AA:00:00:00:00:01"),
];
const RELAYS: u8 = 6;
const DEFAULT_MAX_ON: u32 = 120;

fn interlocks() -> Interlocks {
    let group = |name: &str, slave: usize, relays: &[u8]| MutexGroup {
        name: name.into(),
        master: SLAVES[slave].0.into(),
        slave_mac: SLAVES[slave].1.into(),
        relays: relays.to_vec(),
    };
    let limit = |slave: usize, relay: u8, max_on: Option<u32>, min_off: Option<u32>| RelayLimit {
        master: SLAVES[slave].0.into(),
        slave_mac: SLAVES[slave].1.into(),
        relay,
        max_on_seconds: max_on,
        min_off_seconds: min_off,
    };
    Interlocks {
        // Relay 1 of slave 0 is in two overlapping groups.
        mutex_groups: vec![
            group("g1", 0, &[0, 1]),
            group("g2", 0, &[1, 2, 3]),
            group("g3", 1, &[0, 1]),
        ],
        limits: vec![
            limit(0, 0, Some(30), Some(10)),
            limit(0, 2, None, Some(20)),
            limit(1, 1, Some(5), Some(3)),
            limit(2, 4, Some(1), Some(1)),
        ],
        default_max_on_seconds: Some(DEFAULT_MAX_ON),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Request {
        source: Source,
        priority: i32,
        slave: usize,
        switches: Vec<(u8, Switch)>,
    },
    Advance(i64),
    Observe(usize),
    EStop,
    Reset,
}

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![
        Just(Source::Manual),
        Just(Source::Rule),
        Just(Source::Macro),
        Just(Source::Hold),
        Just(Source::Polling),
    ]
}

fn switch() -> impl Strategy<Value = Switch> {
    prop_oneof![
        2 => Just(Switch::Off),
        1 => Just(Switch::On { duration_s: 0 }),
        3 => (1u32..200).prop_map(|d| Switch::On { duration_s: d }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let request = (
        source(),
        prop_oneof![Just(10), Just(50), Just(90), 0..=100i32],
        0..SLAVES.len(),
        prop::collection::vec((0..RELAYS, switch()), 1..4),
    )
        .prop_map(|(source, priority, slave, mut switches)| {
            let mut seen = BTreeSet::new();
            switches.retain(|(r, _)| seen.insert(*r));
            Op::Request {
                source,
                priority,
                slave,
                switches,
            }
        });
    prop_oneof![
        12 => request,
        6 => (0i64..40_000).prop_map(Op::Advance),
        2 => (0..SLAVES.len()).prop_map(Op::Observe),
        1 => Just(Op::EStop),
        1 => Just(Op::Reset),
    ]
}

#[derive(Clone, Debug, Default)]
struct Phys {
    on: bool,
    on_since: i64,
    last_off: Option<i64>,
    /// Priority of the plan that switched it on (the model of the arbiter's hold).
    hold: Option<i32>,
}

struct World {
    s: Safety,
    cfg: Interlocks,
    now: i64,
    phys: BTreeMap<RelayRef, Phys>,
}

impl World {
    fn new() -> World {
        World {
            s: Safety::new(interlocks()),
            cfg: interlocks(),
            now: 1_700_000_000_000,
            phys: BTreeMap::new(),
        }
    }

    fn max_on_s(&self, r: &RelayRef) -> u32 {
        self.cfg
            .limits
            .iter()
            .find(|l| RelayRef::new(&l.master, &l.slave_mac, l.relay) == *r)
            .and_then(|l| l.max_on_seconds)
            .unwrap_or(DEFAULT_MAX_ON)
    }

    fn min_off_s(&self, r: &RelayRef) -> u32 {
        self.cfg
            .limits
            .iter()
            .find(|l| RelayRef::new(&l.master, &l.slave_mac, l.relay) == *r)
            .and_then(|l| l.min_off_seconds)
            .unwrap_or(0)
    }

    fn is_on(&self, r: &RelayRef) -> bool {
        self.phys.get(r).is_some_and(|p| p.on)
    }

    fn assert_mutex(&self) -> Result<(), TestCaseError> {
        for g in &self.cfg.mutex_groups {
            let on: Vec<u8> = g
                .relays
                .iter()
                .copied()
                .filter(|r| self.is_on(&RelayRef::new(&g.master, &g.slave_mac, *r)))
                .collect();
            prop_assert!(on.len() <= 1, "group {} has {:?} on together", g.name, on);
        }
        Ok(())
    }

    fn assert_steady(&self) -> Result<(), TestCaseError> {
        self.assert_mutex()?;
        for (r, p) in &self.phys {
            if p.on {
                prop_assert!(
                    self.now - p.on_since <= i64::from(self.max_on_s(r)) * 1000,
                    "{r} on for {} ms beyond max on {} s",
                    self.now - p.on_since,
                    self.max_on_s(r)
                );
                prop_assert!(self.s.emergency().is_none(), "{r} on during the latch");
            }
        }
        // The arbiter never loses track of a relay that is on (nor imagines one).
        let believed: BTreeSet<RelayRef> = self.s.relays_on().into_iter().map(|(r, _)| r).collect();
        let real: BTreeSet<RelayRef> = self
            .phys
            .iter()
            .filter(|(_, p)| p.on)
            .map(|(r, _)| r.clone())
            .collect();
        prop_assert_eq!(believed, real);
        Ok(())
    }

    /// Sends a plan: the slave applies its switches in order, invariants after each one.
    fn send(&mut self, plan: &Plan) -> Result<(), TestCaseError> {
        for sw in &plan.switches {
            let r = RelayRef::new(&plan.master, &plan.slave_mac, sw.relay);
            let min_off = self.min_off_s(&r);
            let now = self.now;
            let latched = self.s.emergency().is_some();
            let p = self.phys.entry(r.clone()).or_default();
            if plan.source != Source::Safety {
                prop_assert!(
                    p.hold.is_none_or(|h| h <= plan.priority),
                    "{r} held at {:?} changed by priority {}",
                    p.hold,
                    plan.priority
                );
            }
            if sw.on {
                prop_assert!(!latched, "{r} switched on during the latch");
                prop_assert!(sw.duration_s > 0, "max on-time always gives a duration");
                if !p.on {
                    if let Some(off) = p.last_off {
                        prop_assert!(
                            now - off >= i64::from(min_off) * 1000,
                            "{r} on {} ms after off, min off {} s",
                            now - off,
                            min_off
                        );
                    }
                    p.on = true;
                    p.on_since = now;
                }
                p.hold = Some(plan.priority);
            } else {
                if p.on {
                    p.on = false;
                    p.last_off = Some(now);
                }
                p.hold = None;
            }
            self.assert_mutex()?;
        }
        self.s.apply(plan, self.now);
        Ok(())
    }

    fn run_due(&mut self) -> Result<(), TestCaseError> {
        for plan in self.s.due(self.now) {
            prop_assert_eq!(plan.source, Source::Safety);
            self.send(&plan)?;
        }
        self.assert_steady()
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Request {
                source,
                priority,
                slave,
                switches,
            } => {
                let rq = SwitchRequest {
                    source: *source,
                    priority: *priority,
                    master: SLAVES[*slave].0.into(),
                    slave_mac: SLAVES[*slave].1.into(),
                    switches: switches.clone(),
                };
                let before = self.s.snapshot();
                match self.s.check(&rq, self.now) {
                    Ok(plan) => {
                        // The plan covers every asked relay, as asked (all-or-nothing).
                        for (r, sw) in switches {
                            let ok = plan
                                .switches
                                .iter()
                                .any(|p| p.relay == *r && p.on == matches!(sw, Switch::On { .. }));
                            prop_assert!(ok, "relay {r} missing from plan");
                        }
                        self.send(&plan)?;
                    }
                    Err(e) => {
                        prop_assert!(!e.to_string().is_empty());
                        prop_assert_eq!(self.s.snapshot(), before);
                    }
                }
            }
            Op::Advance(dt) => {
                let target = self.now + dt;
                let mut rounds = 0;
                while let Some(d) = self.s.next_deadline_ms() {
                    if d > target {
                        break;
                    }
                    self.now = self.now.max(d);
                    self.run_due()?;
                    rounds += 1;
                    prop_assert!(rounds < 10_000, "due never settles");
                }
                self.now = target;
            }
            Op::Observe(slave) => {
                let (m, mac) = SLAVES[*slave];
                let states: Vec<bool> = (0..16)
                    .map(|r| self.is_on(&RelayRef::new(m, mac, r)))
                    .collect();
                self.s.observe(m, mac, &states, self.now);
            }
            Op::EStop => {
                self.s.emergency_stop("storm", "proptest", self.now);
                for p in self.phys.values_mut() {
                    p.hold = None;
                }
                self.run_due()?;
                prop_assert!(self.phys.values().all(|p| !p.on));
            }
            Op::Reset => {
                self.s.reset("proptest", self.now);
            }
        }
        self.assert_steady()
    }
}

fn probe_requests() -> Vec<SwitchRequest> {
    let mut out = Vec::new();
    for (m, mac) in SLAVES {
        for r in 0..RELAYS {
            for sw in [Switch::Off, Switch::On { duration_s: 0 }] {
                out.push(SwitchRequest {
                    source: Source::Manual,
                    priority: 50,
                    master: m.into(),
                    slave_mac: mac.into(),
                    switches: vec![(r, sw)],
                });
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn storm_keeps_every_safety_invariant(ops in prop::collection::vec(op(), 100..300)) {
        let mut w = World::new();
        for op in &ops {
            w.step(op)?;
        }
    }

    #[test]
    fn snapshot_restore_round_trip(ops in prop::collection::vec(op(), 0..150), later in 0i64..200_000) {
        let mut w = World::new();
        for op in &ops {
            w.step(op)?;
        }
        let snap = w.s.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let mut restored = Safety::new(interlocks());
        restored.restore(serde_json::from_str(&json).unwrap());
        prop_assert_eq!(restored.snapshot(), snap);
        prop_assert_eq!(restored.next_deadline_ms(), w.s.next_deadline_ms());
        prop_assert_eq!(restored.emergency(), w.s.emergency());
        let at = w.now + later;
        for rq in probe_requests() {
            prop_assert_eq!(restored.check(&rq, at), w.s.check(&rq, at));
        }
        prop_assert_eq!(restored.due(at), w.s.due(at));
    }

    #[test]
    fn arbitrary_inputs_never_panic(
        master in ".{0,4}",
        mac in prop_oneof![Just("AA:00:00:00:00:01".to_string()), "[0-9a-fA-F:]{0,20}"],
        priority in any::<i32>(),
        switches in prop::collection::vec((any::<u8>(), prop_oneof![Just(Switch::Off), any::<u32>().prop_map(|d| Switch::On { duration_s: d })]), 0..20),
        states in prop::collection::vec(any::<bool>(), 0..40),
        now in any::<i64>(),
    ) {
        let mut s = Safety::new(interlocks());
        s.observe(&master, &mac, &states, now);
        let rq = SwitchRequest { source: Source::Manual, priority, master: master.clone(), slave_mac: mac.clone(), switches };
        if let Ok(plan) = s.check(&rq, now) {
            s.apply(&plan, now);
            let _ = plan.summary();
        }
        s.due(now);
        s.emergency_stop("x", "y", now);
        s.due(now);
        let _ = s.next_deadline_ms();
        s.reset("y", now);
    }
}
