//! The wire contract of kiln: protobuf messages and tonic services generated from
//! `proto/kiln.proto`, and nothing else.
#![allow(clippy::all, missing_docs)]

/// Version 1 of the kiln protocol.
pub mod v1 {
    tonic::include_proto!("kiln.v1");
}
