//! kiln's own MLP with random weights, exported to ONNX: the model the serving
//! tests deploy (included by them with `#[path]`, so it is one piece of code).

use kiln_common::jobspec::Activation;
use kiln_worker::train::arch::{Arch, Task};
use kiln_worker::train::data::Standardizer;
use kiln_worker::train::onnx::{export, ExportMeta};
use rand::{Rng, SeedableRng};

/// A `features`-`hidden`-`classes` tanh classifier with weights drawn uniformly
/// from [-1, 1) by `seed`, its inputs standardised with mean 0.5 and deviation 2,
/// as ONNX bytes (input `input`, [batch, features] FP32).
pub fn mlp_onnx(seed: u64, features: usize, hidden: &[usize], classes: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let arch = Arch {
        inputs: features,
        hidden: hidden.to_vec(),
        activation: Activation::Tanh,
        task: Task::Classification {
            classes: (0..classes).map(|c| format!("c{c}")).collect(),
        },
    };
    let flat: Vec<f32> = (0..arch.parameter_count())
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let standardizer = Standardizer {
        mean: vec![0.5; features],
        std: vec![2.0; features],
    };
    let meta = ExportMeta {
        features: (0..features).map(|i| format!("f{i}")).collect(),
        label: "kind".into(),
        ..Default::default()
    };
    export(
        &arch,
        &arch.split(&flat).expect("parameters"),
        &standardizer,
        &meta,
    )
    .expect("export")
}
