//! The wire contract of kiln: protobuf messages and tonic services generated from
//! `proto/kiln.proto`, and the subset of the ONNX model format (`proto/onnx.proto`)
//! that kiln's exporter writes, and nothing else.
#![allow(clippy::all, missing_docs)]

/// Version 1 of the kiln protocol.
pub mod v1 {
    tonic::include_proto!("kiln.v1");
}

/// The ONNX model format, as far as kiln writes it: field numbers are ONNX's own, so
/// any ONNX reader parses the bytes.
pub mod onnx {
    tonic::include_proto!("onnx");
}
