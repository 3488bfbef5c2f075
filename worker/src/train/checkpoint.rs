//! Checkpoints: a shard's whole training state as one safetensors file, so that a
//! restarted gang resumes exactly where the checkpoint left it.
//!
//! Tensors (all f32, little endian, one dimension): `params` (the flat parameter
//! buffer, see [`super::arch::Arch::split`]) and `optim.<name>` for each optimizer
//! buffer. Metadata (strings): `kiln.step` (optimizer steps taken, which is also
//! the global training step), `kiln.format` (this layout's version) and whatever
//! the caller adds (the job, the spec digest).

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::optim::OptimizerState;

/// The layout version written in `kiln.format`.
pub const FORMAT: &str = "kiln-checkpoint-1";
/// The file name of a checkpoint inside its artifact version.
pub const FILE_NAME: &str = "checkpoint.safetensors";

/// A shard's training state.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub params: Vec<f32>,
    pub optimizer: OptimizerState,
    /// Extra metadata, kept as written.
    pub meta: BTreeMap<String, String>,
}

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("the checkpoint is not a safetensors file: {0}")]
    Format(String),
    #[error("the checkpoint lacks {0}")]
    Missing(String),
    #[error("the checkpoint's {name} is {got}, expected {want}")]
    Mismatch {
        name: String,
        got: String,
        want: String,
    },
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_bytes(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, CheckpointError> {
    if view.dtype() != Dtype::F32 {
        return Err(CheckpointError::Mismatch {
            name: format!("tensor {name}'s type"),
            got: format!("{:?}", view.dtype()),
            want: "F32".into(),
        });
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

impl Checkpoint {
    /// Serializes the checkpoint.
    pub fn encode(&self) -> Result<Vec<u8>, CheckpointError> {
        let mut buffers: Vec<(String, Vec<u8>, usize)> =
            vec![("params".into(), to_bytes(&self.params), self.params.len())];
        for (name, values) in &self.optimizer.buffers {
            buffers.push((format!("optim.{name}"), to_bytes(values), values.len()));
        }
        let mut views = Vec::with_capacity(buffers.len());
        for (name, bytes, len) in &buffers {
            let view = TensorView::new(Dtype::F32, vec![*len], bytes)
                .map_err(|e| CheckpointError::Format(e.to_string()))?;
            views.push((name.clone(), view));
        }
        let mut meta: HashMap<String, String> = self.meta.clone().into_iter().collect();
        meta.insert("kiln.step".into(), self.optimizer.step.to_string());
        meta.insert("kiln.format".into(), FORMAT.into());
        safetensors::serialize(views, Some(meta))
            .map_err(|e| CheckpointError::Format(e.to_string()))
    }

    /// Reads a checkpoint written by [`Checkpoint::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| CheckpointError::Format(e.to_string()))?;
        let mut meta: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        match meta.remove("kiln.format") {
            Some(f) if f == FORMAT => {}
            Some(f) => {
                return Err(CheckpointError::Mismatch {
                    name: "format".into(),
                    got: f,
                    want: FORMAT.into(),
                })
            }
            None => return Err(CheckpointError::Missing("kiln.format".into())),
        }
        let step = meta
            .remove("kiln.step")
            .ok_or_else(|| CheckpointError::Missing("kiln.step".into()))?;
        let step = step.parse::<u64>().map_err(|_| CheckpointError::Mismatch {
            name: "kiln.step".into(),
            got: step.clone(),
            want: "a step number".into(),
        })?;
        let tensors =
            SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Format(e.to_string()))?;
        let mut params = None;
        let mut buffers = BTreeMap::new();
        for (name, view) in tensors.tensors() {
            let values = from_bytes(&name, &view)?;
            if name == "params" {
                params = Some(values);
            } else if let Some(buffer) = name.strip_prefix("optim.") {
                buffers.insert(buffer.to_string(), values);
            }
        }
        Ok(Checkpoint {
            params: params.ok_or_else(|| CheckpointError::Missing("the params tensor".into()))?,
            optimizer: OptimizerState { step, buffers },
            meta,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_bit_for_bit() {
        let mut buffers = BTreeMap::new();
        buffers.insert("exp_avg".to_string(), vec![0.5, -0.25, 1e-30]);
        buffers.insert("exp_avg_sq".to_string(), vec![1.0, 2.0, f32::MIN_POSITIVE]);
        let checkpoint = Checkpoint {
            params: vec![0.1, -7.5, 3.25],
            optimizer: OptimizerState { step: 42, buffers },
            meta: BTreeMap::from([("kiln.job".to_string(), "7".to_string())]),
        };
        let bytes = checkpoint.encode().expect("encode");
        assert_eq!(Checkpoint::decode(&bytes).expect("decode"), checkpoint);
    }

    #[test]
    fn garbage_and_foreign_files_are_refused_by_name() {
        let err = Checkpoint::decode(b"not a checkpoint").expect_err("garbage");
        assert!(err.to_string().contains("not a safetensors file"), "{err}");
        let data = to_bytes(&[1.0]);
        let view = TensorView::new(Dtype::F32, vec![1], &data).expect("view");
        let foreign = safetensors::serialize(vec![("w".to_string(), view)], None).expect("write");
        let err = Checkpoint::decode(&foreign).expect_err("no format");
        assert!(err.to_string().contains("kiln.format"), "{err}");
    }
}
