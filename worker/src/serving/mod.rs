//! Serving ONNX models behind the Open Inference Protocol (KServe v2).
//!
//! - `protocol`: the KServe v2 wire formats, REST JSON tensors, the binary tensor
//!   extension and the gRPC messages, to and from [`Tensor`]s; syntax only.
//! - `engine`: one replica's model: a tract plan with a symbolic batch dimension,
//!   its [`Signature`], and a dynamic batcher (bounded queue, deadline per
//!   request, inference threads) that checks requests against the signature.
//! - `replicas`: the supervisor of this worker's replicas and the table of the
//!   ready ones.
//! - `router`: sends each request to a ready replica of its deployment, here or
//!   on another worker (power of two choices, canary share, one retry).
//! - `monitor`: counts what a replica serves into its model version's reference
//!   bins (drift telemetry).
//! - `statistics`: Triton's statistics and repository index as data: a
//!   replica's counters read as Triton's per-version statistics, their sums
//!   over the cluster, the index of the routes.
//! - `grpc`: the KServe v2 gRPC service on the inference gRPC port, over the
//!   same router.
//! - `feedback`: ground truth: the answers of recent requests by id (bounded),
//!   labels matched to them and scored per model version for telemetry; the
//!   router serves `POST /v2/models/{m}/feedback` over it.
//!
//! The boundary between them is [`Tensor`]: a name, a datatype, a shape and the
//! values as little-endian bytes in row-major order, which is what the binary
//! extension and gRPC's raw contents carry, so they pass through without a copy
//! per element. Errors are [`kiln_common::Error`]s, whose kinds map to the status
//! codes Triton uses (`InvalidArgument` 400, `NotFound` 404, `ResourceExhausted`
//! 429, `Unavailable` 503, `Timeout` 504, `Internal` 500).

pub mod engine;
pub mod feedback;
pub mod grpc;
pub mod monitor;
pub mod protocol;
pub mod replicas;
pub mod router;
pub mod statistics;

use bytes::Bytes;

/// The KServe v2 datatypes kiln serves. FP16 and BF16 travel as IEEE half and
/// bfloat16 bits; in JSON they are numbers. BYTES elements (strings) travel as the
/// binary extension and gRPC's raw contents carry them, each a 4-byte
/// little-endian length and that many bytes ([`split_bytes`]); in JSON they are
/// strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp32,
    Fp64,
    Fp16,
    Bf16,
    Bytes,
}

impl DataType {
    /// Every datatype, for listings and tests.
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Bytes,
    ];

    /// The protocol's name: `FP32`, `INT64`, ...
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a protocol name; an unknown or unsupported one is an error naming it.
    pub fn parse(name: &str) -> kiln_common::Result<DataType> {
        DataType::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| {
                kiln_common::Error::InvalidArgument(format!(
                    "datatype {name:?} is not served; use one of {}",
                    DataType::ALL.map(|d| d.name()).join(", ")
                ))
            })
    }

    /// Bytes per element (BOOL takes one byte, as in the binary extension);
    /// `None` for BYTES, whose elements each take their own length.
    pub fn fixed_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// The fewest bytes an element takes: its size, or a BYTES element's length
    /// prefix. Bounds what a shape may ask to allocate.
    pub fn min_size(self) -> usize {
        self.fixed_size().unwrap_or(BYTES_PREFIX)
    }
}

/// The length prefix of a BYTES element.
pub const BYTES_PREFIX: usize = 4;

/// Walks BYTES data element by element, calling `each` with each one's index,
/// byte offset (of its length prefix) and bytes, without allocating; returns how
/// many there are. An error says where the length prefixes do not walk to the
/// end of the data exactly, or is `each`'s.
pub fn walk_bytes<'a>(
    data: &'a [u8],
    mut each: impl FnMut(usize, usize, &'a [u8]) -> Result<(), String>,
) -> Result<usize, String> {
    let mut index = 0;
    let mut rest = data;
    while !rest.is_empty() {
        let Some((prefix, after)) = rest.split_first_chunk::<BYTES_PREFIX>() else {
            return Err(format!(
                "BYTES element {index} starts with {} bytes, less than its 4-byte length",
                rest.len()
            ));
        };
        let len = u32::from_le_bytes(*prefix) as usize;
        if len > after.len() {
            return Err(format!(
                "BYTES element {index} claims {len} bytes but {} remain",
                after.len()
            ));
        }
        let (element, after) = after.split_at(len);
        each(index, data.len() - rest.len(), element)?;
        index += 1;
        rest = after;
    }
    Ok(index)
}

/// Splits BYTES data into its elements (see [`walk_bytes`]).
pub fn split_bytes(data: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut elements = Vec::new();
    walk_bytes(data, |_, _, element| {
        elements.push(element);
        Ok(())
    })?;
    Ok(elements)
}

/// Checks that every BYTES element is UTF-8 text without a NUL character (what
/// ONNX Runtime's string tensors hold); the error names the first that is not.
pub fn check_text(data: &[u8]) -> Result<(), String> {
    walk_bytes(data, |at, _, element| match std::str::from_utf8(element) {
        Err(_) => Err(format!("element {at} is not UTF-8 text")),
        Ok(text) if text.contains('\0') => Err(format!("element {at} holds a NUL character")),
        Ok(_) => Ok(()),
    })
    .map(drop)
}

/// Writes one BYTES element: its length, then its bytes.
pub fn push_bytes_element(out: &mut Vec<u8>, element: &[u8]) {
    // Elements come from bodies of at most 64 MiB, so the length fits.
    out.extend_from_slice(&(element.len() as u32).to_le_bytes());
    out.extend_from_slice(element);
}

/// The byte offsets at which every `step`-th BYTES element starts, and the
/// data's length last: where rows of `step` elements each begin and end. An
/// error when the elements are not a whole number of rows.
pub fn bytes_row_offsets(data: &[u8], step: usize) -> Result<Vec<usize>, String> {
    let mut offsets = Vec::new();
    let count = walk_bytes(data, |at, offset, _| {
        if step > 0 && at % step == 0 {
            offsets.push(offset);
        }
        Ok(())
    })?;
    if step == 0 || count % step != 0 {
        return Err(format!("{count} BYTES elements are not rows of {step}"));
    }
    offsets.push(data.len());
    Ok(offsets)
}

/// A named tensor as requests and responses carry it: `data` holds
/// `shape.product()` elements, little-endian, row-major (BYTES elements each
/// with its length prefix).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl Tensor {
    /// Number of elements its shape holds.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// A tensor of zeros (empty strings for BYTES).
    pub fn zeros(name: &str, datatype: DataType, shape: Vec<usize>) -> Tensor {
        let bytes = shape.iter().product::<usize>() * datatype.min_size();
        Tensor {
            name: name.to_string(),
            datatype,
            shape,
            data: vec![0u8; bytes].into(),
        }
    }

    /// Checks that `data` holds exactly the elements its shape asks for; the
    /// error says what it holds instead.
    pub fn check_data(&self) -> Result<(), String> {
        let elements = self.shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
        match self.datatype.fixed_size() {
            Some(size) => {
                let bytes = elements.and_then(|n| n.checked_mul(size));
                if bytes != Some(self.data.len()) {
                    return Err(format!(
                        "shape {:?} of {} takes {} bytes, got {}",
                        self.shape,
                        self.datatype.name(),
                        bytes.map_or("too many".to_string(), |b| b.to_string()),
                        self.data.len()
                    ));
                }
            }
            None => {
                let found = walk_bytes(&self.data, |_, _, _| Ok(()))?;
                if Some(found) != elements {
                    return Err(format!(
                        "shape {:?} holds {} BYTES elements, got {found}",
                        self.shape,
                        elements.map_or("too many".to_string(), |n| n.to_string()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Its values as `f64` (exact for every datatype but 64-bit integers beyond
    /// 2^53); BYTES elements are not numbers, and give none.
    pub fn values_f64(&self) -> Vec<f64> {
        fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
            data.as_chunks::<N>().0.iter().map(|&b| f(b)).collect()
        }
        let d = &self.data[..];
        match self.datatype {
            DataType::Bool => d.iter().map(|&b| f64::from(u8::from(b != 0))).collect(),
            DataType::Uint8 => d.iter().map(|&b| f64::from(b)).collect(),
            DataType::Int8 => each(d, |b| f64::from(i8::from_le_bytes(b))),
            DataType::Uint16 => each(d, |b| f64::from(u16::from_le_bytes(b))),
            DataType::Int16 => each(d, |b| f64::from(i16::from_le_bytes(b))),
            DataType::Uint32 => each(d, |b| f64::from(u32::from_le_bytes(b))),
            DataType::Int32 => each(d, |b| f64::from(i32::from_le_bytes(b))),
            DataType::Fp32 => each(d, |b| f64::from(f32::from_le_bytes(b))),
            DataType::Uint64 => each(d, |b| u64::from_le_bytes(b) as f64),
            DataType::Int64 => each(d, |b| i64::from_le_bytes(b) as f64),
            DataType::Fp64 => each(d, f64::from_le_bytes),
            DataType::Fp16 => each(d, |b| half::f16::from_le_bytes(b).to_f64()),
            DataType::Bf16 => each(d, |b| half::bf16::from_le_bytes(b).to_f64()),
            DataType::Bytes => Vec::new(),
        }
    }
}

/// One input or output of a model: a variable dimension is `-1` (the batch
/// dimension always is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// What a model takes and gives, in the model's order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature {
    pub inputs: Vec<Spec>,
    pub outputs: Vec<Spec>,
}

impl Spec {
    /// The registry's form of this spec.
    pub fn to_proto(&self) -> kiln_proto::v1::TensorSpec {
        kiln_proto::v1::TensorSpec {
            name: self.name.clone(),
            datatype: self.datatype.name().to_string(),
            shape: self.shape.clone(),
        }
    }
}
