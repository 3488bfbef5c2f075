//! The KServe v2 wire formats (REST JSON, the binary tensor extension, gRPC) to and
//! from [`super::Tensor`]s.
