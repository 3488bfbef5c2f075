//! The wire contract of kiln: protobuf messages and tonic services generated from
//! `proto/kiln.proto`, the subset of the ONNX model format (`proto/onnx.proto`)
//! that kiln's exporter writes, and the Open Inference Protocol's gRPC service
//! (`proto/inference.proto`) that serving replicas answer, and nothing else.
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

/// The Open Inference Protocol (KServe v2) gRPC service and messages: package and
/// field numbers are the protocol's, so Triton's and KServe's clients call kiln
/// unchanged. Tensor bytes are `bytes::Bytes`.
pub mod inference {
    tonic::include_proto!("inference");
}
