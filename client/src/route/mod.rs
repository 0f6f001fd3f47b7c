//! The sans-IO routing core: which cluster and partition a record goes to,
//! when a producer holds, flushes and acknowledges, when a consumer may
//! deliver past a fence, and what the controller does next in a switch.
//!
//! Nothing here does I/O, reads a clock, spawns a task or draws randomness:
//! time comes in as `now: UnixMillis`, registry state as a
//! [`FleetSnapshot`](crate::registry::FleetSnapshot) or
//! [`TopicRoute`](crate::registry::TopicRoute), Kafka outcomes as events. The
//! rdkafka/etcd adapters and the simulator drive exactly this code.
//!
//! # Pieces
//!
//! | module | used by | what |
//! | --- | --- | --- |
//! | [`murmur2`](mod@murmur2) | producer | Kafka's key → partition (`Utils.murmur2`, bit-exact) |
//! | [`rendezvous`] | producer | weighted rendezvous hashing: key → cluster within an epoch |
//! | [`router`] | producer adapter | [`Router`]: routes records, drives hold → flush → ack → release |
//! | [`gate`] | consumer adapter | [`FenceGate`]: how far each (cluster, partition) may be delivered |
//! | [`switch`] | controller | [`propose`], [`plan`], [`seal`], [`abort`], [`may_retire`] |
//!
//! # The handoff, epoch `N` → `N+1`, and who does what
//!
//! 1. Operator: [`propose`] appends `N+1` as `pending` (the adapter CASes it in).
//! 2. Every producer's [`Router::on_snapshot`] sees it: the topic is held
//!    ([`Decision::Hold`]), the adapter gets [`Action::Flush`] for epoch `N`
//!    if anything is in flight, answers with [`Router::on_flushed`] /
//!    [`Router::on_settled`], and receives [`Action::Ack`]: it writes
//!    `acked[topic] = N+1` into its client record. A producer with nothing in
//!    flight acknowledges at once.
//! 3. Controller: [`plan`] returns `WaitForAcks` until every live producer
//!    has acked (or the deadline passes), then `ReadBoundary { clusters }`;
//!    the adapter reads the end offsets and [`seal`] builds the single new
//!    route value (fence on `N`, `N` sealed, `N+1` open) for one CAS. With
//!    [`OnAckDeadline::Abort`] it gets `Abort` instead and writes [`abort`].
//! 4. Producers see `N+1` open: [`Action::Release`], held records are routed
//!    again (now with `N+1`), every record carries its epoch in a header.
//!    On abort they are released on `N`.
//! 5. Consumers: [`FenceGate`] keeps `X/p` at or above `X`'s boundary until
//!    the group has committed `p` on every other epoch-`N` cluster up to its
//!    boundary; [`FenceGate::classify`] flags stragglers (delivered, counted)
//!    and records from epochs the consumer has not seen yet (pause).
//!    [`read_set`] lists the clusters to read: a sealed epoch's cluster stays
//!    in it until it is retired, so stragglers above the fence are read.
//! 6. Controller: [`may_retire`] says when a drained cluster can go: no
//!    open/pending epoch uses it and every registered group has consumed it
//!    to its current end offsets (not only its fences).
//!
//! The ack deadline of step 3 is written with the proposer's clock; the
//! controller adapter passes [`plan`] a `now` of `created_at` plus how long it
//! has itself seen the epoch pending (its monotonic clock), so clock skew or a
//! registry outage never makes it seal early.
//!
//! # Seams
//!
//! - The producer adapter owns the Kafka producers (one per cluster, created
//!   on [`Action::Open`], dropped on [`Action::Close`]), the held-record
//!   buffer and its backpressure (re-routing held records in order on
//!   `Release`), the registry write of acks, and reports every `Send`'s
//!   outcome once ([`Router::on_settled`]) or answers every `Flush`
//!   ([`Router::on_flushed`]), as chosen by [`Settlement`].
//! - The consumer adapter feeds the route and the group's committed offsets
//!   into the gate, pauses/resumes partitions on its answers, and keeps the
//!   straggler counter in metrics.
//! - The controller adapter owns the clock, the election, the Kafka admin
//!   calls that read end offsets, and the CAS writes.

pub mod gate;
pub mod murmur2;
pub mod rendezvous;
pub mod router;
pub mod switch;

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use gate::{gated_by_route, prejoin_set, read_set, FenceGate, GateAction, RecordClass};
pub use murmur2::{murmur2, partition_for_key};
pub use rendezvous::{cluster_for_key, RendezvousTable};
pub use router::{Action, ClusterStatus, Decision, NoRoute, Router, Settlement};
pub use switch::{abort, may_retire, plan, propose, seal, LateSeals, OnAckDeadline, SwitchStep};
