//! Consensus: raft-rs `RawNode` driven by one actor on its own thread.

pub mod logger;
pub mod node;
pub mod storage;
pub mod transport;

#[cfg(test)]
mod storage_suite;
