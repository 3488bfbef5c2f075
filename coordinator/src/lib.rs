//! The kiln coordinator.
//!
//! Layout:
//! - `raft`: consensus. `node` (the [`raft::node::RaftNode`] actor over raft-rs
//!   `RawNode`), `storage` (RocksDB and in-memory stores behind one trait),
//!   `transport` (batched gRPC messages, streamed snapshots), `logger` (slog into
//!   tracing).
//! - `state`: the replicated state machine: `machine` (deterministic apply),
//!   `keys` (key layout), `reader` (read-only access for API tasks), `artifacts`
//!   (versions, tags, chunk records).
//! - `health`: worker heartbeats and the Alive → Suspect → Down policy.
//! - `scheduler`: gang placement of training jobs (all shards or none, best fit,
//!   priority then age), as pure functions the leader's scheduler loop will call.
//! - `monitor`: the leader's telemetry windows; `canary`: the verdict on a
//!   retrain policy's canary; `webhook`: alert deliveries.
//! - `api`: the gRPC service and the HTTP endpoints.
//! - `server`: wiring and ordered shutdown.
//!
//! Data flow: a client call reaches `api::grpc`, which proposes a command to the
//! Raft node (or forwards it to the leader); the node replicates it, applies it
//! through `state::machine` in one RocksDB batch with the applied index, and
//! answers the caller; reads wait for ReadIndex and then use `state::reader`.

pub mod api;
pub mod auth;
pub mod autoscaler;
pub mod canary;
pub mod health;
pub mod monitor;
pub mod raft;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod webhook;

pub use server::run;
