//! Cluster tests of kiln: real `kiln` processes on loopback ports, with temporary
//! data dirs, killed for real (in the manner of quickwit's `ClusterSandbox` and
//! tikv's `test_raftstore`).
//!
//! Layout:
//! - `port`: [`free_port`], loopback ports that no other test of this process holds.
//! - `process`: [`Proc`], one child process that logs to a file and dies with its
//!   handle (SIGKILL), or on request with SIGTERM.
//! - `cli`: [`kiln_bin`], where the binary under test lives, and [`run_kiln`], a
//!   bounded run of one CLI command.
//! - `wait`: [`wait_for`], the one bounded polling loop every wait goes through.
//! - `cluster`: [`Cluster`], coordinators and workers in one temporary dir; it
//!   crashes, stops, restarts and adds nodes, hands out clients, and on a failing
//!   test prints the tail of every node's log and keeps the dir.
//! - `http`: [`http_get`], one GET with an optional bearer token, over HTTPS to
//!   the addresses a TLS cluster registered with [`trust`].
//! - `mlflow`: the real `mlflow` client's venv, bounded runs of its scripts, and a
//!   cluster with workers for them.
//! - `writer`: [`Writer`], a background client that writes distinct keys and
//!   remembers what was attempted and what was acknowledged, and [`WriterLog`],
//!   which checks those writes against a node afterwards.
//!
//! Each test file under `tests/` is its own process; each test builds its own
//! [`Cluster`] on its own ports, so tests run side by side.

mod cli;
mod cluster;
mod http;
pub mod mlflow;
mod port;
mod process;
mod wait;
mod writer;

pub use cli::{kiln_bin, peak_rss, run_kiln, run_kiln_measured, stderr_text, CLI_TIMEOUT};
pub use cluster::{run_kiln_sync, shard_workers, Cluster};
pub use http::{http_call, http_get, http_get_plaintext, http_request, trust, HttpAnswer};
pub use port::free_port;
pub use process::Proc;
pub use wait::{wait_for, wait_ready, POLL_INTERVAL};
pub use writer::{longest_ack_gap, Writer, WriterLog};

pub use kiln_common::client::{ClientOptions, ClusterClient};
pub use kiln_proto::v1;
