//! End to end through the whole core: producers ([`Router`]), the controller
//! ([`propose`], [`plan`], [`seal`], [`abort`]) and a consumer group
//! ([`FenceGate`]) around simulated Kafka logs, under any interleaving of
//! their events. Every record is delivered exactly once, and per key in the
//! order it was produced, across any chain of switches.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::gate::{FenceGate, RecordClass};
use super::router::{Action, Decision, Router, Settlement};
use super::switch::{abort, plan, propose, seal, OnAckDeadline, SwitchStep};
use super::testutil::*;
use crate::registry::{ClientRecord, FleetSnapshot, TopicRoute, WeightedCluster};

const CL: [&str; 4] = ["a", "b", "c", "d"];
const PARTS: u32 = 2;
const TOPIC: &str = "t";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    key: u8,
    seq: u32,
    epoch: u64,
}

#[derive(Debug, Clone)]
enum Op {
    /// The application of producer `p` produces key `k` (keys belong to one producer).
    Produce(u8),
    /// A producer's registry watch delivers the current snapshot.
    Watch(usize),
    /// The oldest in-flight record of a producer lands in its log.
    Land(usize),
    /// A producer answers its oldest outstanding flush.
    Flush(usize),
    /// The operator proposes a new write set.
    Propose(u8),
    /// The controller reconciles once.
    Control,
    /// The operator gives up on the pending epoch.
    Abort,
    /// The consumer's watch delivers the route.
    GateRoute,
    /// The consumer delivers from one (cluster, partition).
    Consume(prop::sample::Index),
    /// The group commits a (cluster, partition) at its position.
    Commit(prop::sample::Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..8).prop_map(Op::Produce),
        3 => (0usize..2).prop_map(Op::Watch),
        5 => (0usize..2).prop_map(Op::Land),
        2 => (0usize..2).prop_map(Op::Flush),
        1 => (1u8..16).prop_map(Op::Propose),
        2 => Just(Op::Control),
        1 => Just(Op::Abort),
        2 => Just(Op::GateRoute),
        6 => any::<prop::sample::Index>().prop_map(Op::Consume),
        3 => any::<prop::sample::Index>().prop_map(Op::Commit),
    ]
}

struct Producer {
    router: Router,
    record: ClientRecord,
    /// Held by the adapter (routing said `Hold`), in produce order.
    held: VecDeque<Rec>,
    /// Sent, not landed yet: (cluster, partition, record), in send order.
    inflight: VecDeque<(String, u32, Rec)>,
    flushes: VecDeque<u64>,
}

struct Sim {
    route: TopicRoute,
    producers: Vec<Producer>,
    logs: BTreeMap<(String, u32), Vec<Rec>>,
    next_seq: u32,
    now: u64,
    gate: FenceGate,
    pos: BTreeMap<(String, u32), i64>,
    last: BTreeMap<u8, u32>,
    delivered: usize,
}

impl Sim {
    fn new(first: u8) -> Self {
        let clusters = snapshot(&CL, vec![]).clusters;
        let route = propose(None, TOPIC, PARTS, mask(first), &clusters, 0, u64::MAX / 4).unwrap();
        let producers = (0..2)
            .map(|i| Producer {
                router: Router::with_settlement(if i == 0 {
                    Settlement::PerRecord
                } else {
                    Settlement::PerFlush
                }),
                record: producer(&format!("p{i}"), &[]),
                held: VecDeque::new(),
                inflight: VecDeque::new(),
                flushes: VecDeque::new(),
            })
            .collect();
        let mut logs = BTreeMap::new();
        let mut pos = BTreeMap::new();
        for c in CL {
            for p in 0..PARTS {
                logs.insert((c.to_string(), p), Vec::new());
                pos.insert((c.to_string(), p), 0);
            }
        }
        let mut sim = Sim {
            route,
            producers,
            logs,
            next_seq: 0,
            now: 0,
            gate: FenceGate::new(),
            pos,
            last: BTreeMap::new(),
            delivered: 0,
        };
        sim.watch(0);
        sim.watch(1);
        sim
    }

    fn snapshot(&self) -> FleetSnapshot {
        let mut s = snapshot(&CL, vec![self.route.clone()]);
        for p in &self.producers {
            s.clients
                .insert((p.record.kind, p.record.id.clone()), p.record.clone());
        }
        s
    }

    fn apply(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Ack { epoch, .. } => {
                    self.producers[i].record.acked.insert(TOPIC.into(), epoch);
                }
                Action::Flush { epoch, .. } => self.producers[i].flushes.push_back(epoch),
                Action::Release { .. } => {
                    // Held records go first, in order.
                    let held: Vec<Rec> = self.producers[i].held.drain(..).collect();
                    for r in held {
                        self.send(i, r);
                    }
                }
                Action::Open(_) | Action::Close(_) => {}
            }
        }
    }

    fn send(&mut self, i: usize, mut r: Rec) {
        let p = &mut self.producers[i];
        if !p.held.is_empty() {
            p.held.push_back(r);
            return;
        }
        match p.router.route(TOPIC, Some(&[r.key])) {
            Decision::Send {
                cluster,
                partition,
                epoch,
            } => {
                r.epoch = epoch;
                p.inflight.push_back((cluster.to_string(), partition, r));
            }
            Decision::Hold => p.held.push_back(r),
            Decision::NoRoute(e) => panic!("no route: {e}"),
        }
    }

    fn produce(&mut self, key: u8) {
        let r = Rec {
            key,
            seq: self.next_seq,
            epoch: 0,
        };
        self.next_seq += 1;
        self.send(usize::from(key % 2), r);
    }

    fn watch(&mut self, i: usize) {
        let snap = self.snapshot();
        let acts = self.producers[i].router.on_snapshot(&snap);
        self.apply(i, acts);
    }

    fn land(&mut self, i: usize) -> bool {
        let Some((c, p, r)) = self.producers[i].inflight.pop_front() else {
            return false;
        };
        self.logs.get_mut(&(c, p)).unwrap().push(r);
        let acts = self.producers[i].router.on_settled(TOPIC, r.epoch);
        self.apply(i, acts);
        true
    }

    fn flush(&mut self, i: usize) -> bool {
        let Some(epoch) = self.producers[i].flushes.pop_front() else {
            return false;
        };
        // rdkafka's flush: everything in flight now lands first.
        let n = self.producers[i].inflight.len();
        for _ in 0..n {
            self.land(i);
        }
        let acts = self.producers[i].router.on_flushed(TOPIC, epoch);
        self.apply(i, acts);
        true
    }

    fn control(&mut self) {
        let producers: Vec<ClientRecord> =
            self.producers.iter().map(|p| p.record.clone()).collect();
        match plan(&self.route, &producers, self.now, OnAckDeadline::Proceed) {
            SwitchStep::ReadBoundary {
                epoch,
                clusters,
                late,
            } => {
                assert!(late.is_empty(), "no deadline can pass here");
                let boundary = clusters
                    .iter()
                    .map(|c| {
                        (
                            c.clone(),
                            (0..PARTS)
                                .map(|p| self.logs[&(c.clone(), p)].len() as i64)
                                .collect(),
                        )
                    })
                    .collect();
                self.route = seal(&self.route, epoch, boundary).unwrap();
            }
            SwitchStep::Idle | SwitchStep::WaitForAcks { .. } => {}
            SwitchStep::Abort { reason, .. } => panic!("{reason}"),
        }
    }

    fn slot(&self, i: prop::sample::Index) -> (String, u32) {
        let slots: Vec<_> = self.logs.keys().cloned().collect();
        i.get(&slots).clone()
    }

    fn consume(&mut self, s: &(String, u32)) -> bool {
        let at = self.pos[s];
        let Some(r) = self.logs[s].get(at as usize).copied() else {
            return false;
        };
        if self.gate.allowed_until(&s.0, s.1).is_some_and(|l| at >= l) {
            return false;
        }
        match self.gate.classify(&s.0, s.1, at, Some(r.epoch)) {
            RecordClass::Ahead => return false,
            RecordClass::Straggler => panic!("straggler {r:?} with every producer acking"),
            RecordClass::InOrder => {}
        }
        if let Some(&l) = self.last.get(&r.key) {
            assert!(
                r.seq > l,
                "key {} out of order: seq {} (epoch {}) after {l}",
                r.key,
                r.seq,
                r.epoch
            );
        }
        self.last.insert(r.key, r.seq);
        *self.pos.get_mut(s).unwrap() += 1;
        self.delivered += 1;
        true
    }

    fn commit(&mut self, s: &(String, u32)) {
        let p = self.pos[s];
        self.gate.on_committed(&s.0, s.1, p);
    }

    fn step(&mut self, op: Op) {
        self.now += 1;
        match op {
            Op::Produce(k) => self.produce(k),
            Op::Watch(i) => self.watch(i),
            Op::Land(i) => {
                self.land(i);
            }
            Op::Flush(i) => {
                self.flush(i);
            }
            Op::Propose(m) => {
                let clusters = snapshot(&CL, vec![]).clusters;
                if let Ok(r) = propose(
                    Some(&self.route),
                    TOPIC,
                    PARTS,
                    mask(m),
                    &clusters,
                    self.now,
                    u64::MAX / 4,
                ) {
                    self.route = r;
                }
            }
            Op::Control => self.control(),
            Op::Abort => {
                if let Some(p) = self.route.pending_epoch().map(|e| e.n) {
                    self.route = abort(&self.route, p).unwrap();
                }
            }
            Op::GateRoute => {
                let r = self.route.clone();
                self.gate.on_route(&r);
            }
            Op::Consume(i) => {
                let s = self.slot(i);
                self.consume(&s);
            }
            Op::Commit(i) => {
                let s = self.slot(i);
                self.commit(&s);
            }
        }
    }

    /// Lets every party run until nothing moves; the pending switch, if any, completes.
    fn settle(&mut self) {
        let mut last = None;
        for _ in 0..20 {
            let state = (
                self.delivered,
                self.total(),
                self.route.clone(),
                self.producers
                    .iter()
                    .map(|p| p.held.len() + p.inflight.len() + p.flushes.len())
                    .sum::<usize>(),
                self.producers
                    .iter()
                    .map(|p| p.record.acked.clone())
                    .collect::<Vec<_>>(),
            );
            if last.as_ref() == Some(&state) {
                break;
            }
            last = Some(state);
            for i in 0..2 {
                self.watch(i);
                while self.flush(i) || self.land(i) {}
            }
            self.control();
            let r = self.route.clone();
            self.gate.on_route(&r);
            let slots: Vec<_> = self.logs.keys().cloned().collect();
            for s in &slots {
                while self.consume(s) {}
                self.commit(s);
            }
        }
    }

    fn total(&self) -> usize {
        self.logs.values().map(Vec::len).sum()
    }
}

fn mask(m: u8) -> Vec<WeightedCluster> {
    CL.iter()
        .enumerate()
        .filter(|(i, _)| m & (1 << i) != 0)
        .map(|(i, c)| WeightedCluster {
            cluster: (*c).to_string(),
            weight: 1 + i as u32,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_record_delivered_once_in_key_order(first in 1u8..16, ops in proptest::collection::vec(op(), 1..160)) {
        let mut sim = Sim::new(first);
        for op in ops {
            sim.step(op);
        }
        sim.settle();
        prop_assert!(sim.route.pending_epoch().is_none(), "switch never completed");
        prop_assert_eq!(sim.producers.iter().map(|p| p.held.len() + p.inflight.len()).sum::<usize>(), 0);
        prop_assert_eq!(sim.total() as u32, sim.next_seq, "records lost or duplicated on the way in");
        prop_assert_eq!(sim.delivered, sim.total(), "records stuck behind a fence");
    }
}

/// The simulation is sharp: skipping the gate reorders keys across a switch.
#[test]
fn without_the_gate_keys_reorder() {
    let mut sim = Sim::new(0b0001);
    sim.step(Op::Produce(0));
    sim.step(Op::Land(0));
    sim.step(Op::Propose(0b0010));
    sim.step(Op::Watch(0));
    sim.step(Op::Watch(1));
    sim.step(Op::Control);
    assert_eq!(sim.route.open_epoch().map(|e| e.n), Some(2), "switch done");
    sim.step(Op::Watch(0));
    sim.step(Op::Produce(0));
    sim.step(Op::Land(0));
    // A consumer that ignores fences reads b first.
    let mut order = Vec::new();
    for c in ["b", "a"] {
        for p in 0..PARTS {
            order.extend(sim.logs[&(c.to_string(), p)].iter().map(|r| r.seq));
        }
    }
    assert_eq!(order, vec![1, 0]);
    // The gate holds b back until a is committed past its boundary.
    sim.step(Op::GateRoute);
    let b = (
        String::from("b"),
        super::murmur2::partition_for_key(&[0], PARTS),
    );
    assert!(!sim.consume(&b));
    let a = (String::from("a"), b.1);
    assert!(sim.consume(&a));
    sim.commit(&a);
    assert!(sim.consume(&b));
}
