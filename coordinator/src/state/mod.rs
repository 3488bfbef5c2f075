//! The replicated state machine: what every coordinator applies, in log order.

pub mod artifacts;
pub mod capacity;
pub mod deployments;
pub mod drift;
pub mod jobs;
pub mod keys;
pub mod machine;
pub mod models;
pub mod reader;
pub mod serving;
pub mod tracking;
pub mod trees;
