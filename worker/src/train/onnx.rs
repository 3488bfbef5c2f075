//! The ONNX export of a trained network: one self-contained model that takes raw
//! feature rows and returns what the user asked for (class probabilities or the
//! regressed value), so a server needs nothing but the file.
//!
//! The graph (opset 17, IR 8), for `mlp` with hidden layers:
//!
//! ```text
//! input [batch, features]
//!   │ Sub  standardize.mean        (x - mean)
//!   │ Div  standardize.std         (... / std): the trainer's f32 arithmetic, exactly
//!   │ Gemm dense0.weight, dense0.bias   (transB = 1: weights stay [outputs][inputs])
//!   │ Relu | Tanh | Gelu            (Gelu spelt 0.5·x·(1 + Erf(x / √2)), see below)
//!   │ ...  one Gemm + activation per hidden layer
//!   │ Gemm denseN.weight, denseN.bias
//!   ├─ classification: `logits` [batch, classes] ─ Softmax(axis 1) ─ `output` [batch, classes]
//!   └─ regression: `output` [batch, 1]
//! ```
//!
//! Standardisation stays two nodes instead of being folded into the first layer's
//! weights: folding computes `(W / std)·x - W·mean / std`, which cancels
//! catastrophically in f32 when a feature's mean is large against its deviation,
//! while `Sub` then `Div` repeats [`Standardizer::apply`] operation for operation.
//!
//! Opset 20 has a `Gelu` operator but tract is tested against opsets 9 to 18, so the
//! exact (erf) GELU is written out of `Div`, `Erf`, `Add` and two `Mul`s; tract
//! recognises that pattern and fuses it back into one operator.
//!
//! The metadata (`metadata_props`) carries what a server and the drift monitor need
//! without the registry: `kiln.task`, `kiln.features` and `kiln.classes` (JSON
//! arrays, classes in output order), `kiln.label`, `kiln.run_id`, `kiln.dataset`, and
//! the caller's extra entries.

use kiln_common::jobspec::Activation;
use kiln_proto::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use prost::Message;

use super::arch::{Arch, Dense, Task};
use super::data::Standardizer;

/// The ONNX IR version written: the one that goes with opset 17.
pub const IR_VERSION: i64 = 8;
/// The standard operator set the graph binds against.
pub const OPSET_VERSION: i64 = 17;
/// Name of the graph's input: raw (unstandardised) features, `[batch, features]`.
pub const INPUT: &str = "input";
/// Name of the graph's first output: class probabilities or the regressed value.
pub const OUTPUT: &str = "output";
/// Name of a classifier's second output: the scores before the softmax.
pub const LOGITS: &str = "logits";
/// Name of the symbolic batch dimension.
pub const BATCH: &str = "batch";

/// What the model file says about where it came from, beside its shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportMeta {
    /// Input column names, in the order of the input's second axis.
    pub features: Vec<String>,
    /// The label column the model predicts.
    pub label: String,
    /// The training run that produced the weights; empty when there is none.
    pub run_id: String,
    /// The dataset version trained on, as `NAME@REF`; empty when unknown.
    pub dataset: String,
    /// Further `metadata_props` entries; their keys must differ from kiln's own.
    pub extra: Vec<(String, String)>,
}

/// Why a network could not be exported.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExportError {
    #[error("the architecture has {expected} dense layers but {got} were given")]
    LayerCount { expected: usize, got: usize },
    #[error(
        "layer {layer} is {got_inputs}→{got_outputs} but the architecture says \
         {expected_inputs}→{expected_outputs}"
    )]
    LayerShape {
        layer: usize,
        expected_inputs: usize,
        expected_outputs: usize,
        got_inputs: usize,
        got_outputs: usize,
    },
    #[error("layer {layer}'s {part} holds {got} values, not {expected}")]
    LayerValues {
        layer: usize,
        part: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("the standardizer has {mean} means and {std} deviations for {features} features")]
    StandardizerLength {
        features: usize,
        mean: usize,
        std: usize,
    },
    #[error("the standardizer's deviation of feature {feature} is {value}, not a positive number")]
    BadDeviation { feature: usize, value: f32 },
    #[error("{got} feature names were given for {expected} inputs")]
    FeatureNames { expected: usize, got: usize },
    #[error("the metadata key {0} is given twice")]
    DuplicateMetadata(String),
}

/// Writes the network as a serialized ONNX `ModelProto` (see the module docs for
/// the graph), after checking that every piece fits the architecture.
pub fn export(
    arch: &Arch,
    layers: &[Dense],
    standardizer: &Standardizer,
    meta: &ExportMeta,
) -> Result<Vec<u8>, ExportError> {
    check(arch, layers, standardizer, meta)?;
    let metadata_props = metadata(arch, meta)?;
    let mut graph = Graph::default();

    graph.tensor("standardize.mean", &[arch.inputs], &standardizer.mean);
    graph.tensor("standardize.std", &[arch.inputs], &standardizer.std);
    graph.node("Sub", &[INPUT, "standardize.mean"], "centered", vec![]);
    let mut value = graph.node("Div", &["centered", "standardize.std"], "scaled", vec![]);

    let last = layers.len() - 1;
    for (i, layer) in layers.iter().enumerate() {
        let weight = format!("dense{i}.weight");
        let bias = format!("dense{i}.bias");
        graph.tensor(&weight, &[layer.outputs, layer.inputs], &layer.weight);
        graph.tensor(&bias, &[layer.outputs], &layer.bias);
        let out = match (&arch.task, i == last) {
            (Task::Classification { .. }, true) => LOGITS.to_string(),
            (Task::Regression, true) => OUTPUT.to_string(),
            _ => format!("dense{i}"),
        };
        value = graph.node(
            "Gemm",
            &[&value, &weight, &bias],
            &out,
            vec![int_attribute("transB", 1)],
        );
        if i != last {
            value = graph.activation(arch.activation, &value, i);
        }
    }

    let width = arch.task.outputs();
    let mut outputs = vec![value_info(OUTPUT, width)];
    if let Task::Classification { .. } = arch.task {
        graph.node("Softmax", &[&value], OUTPUT, vec![int_attribute("axis", 1)]);
        outputs.push(value_info(LOGITS, width));
    }

    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "kiln".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET_VERSION,
        }],
        graph: Some(GraphProto {
            node: graph.nodes,
            name: "kiln".into(),
            initializer: graph.initializers,
            input: vec![value_info(INPUT, arch.inputs)],
            output: outputs,
            ..Default::default()
        }),
        metadata_props,
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// Checks that the layers, the standardizer and the names all fit `arch`.
fn check(
    arch: &Arch,
    layers: &[Dense],
    standardizer: &Standardizer,
    meta: &ExportMeta,
) -> Result<(), ExportError> {
    let shapes = arch.layer_shapes();
    if shapes.len() != layers.len() {
        return Err(ExportError::LayerCount {
            expected: shapes.len(),
            got: layers.len(),
        });
    }
    for (layer, (&(inputs, outputs), dense)) in shapes.iter().zip(layers).enumerate() {
        if (dense.inputs, dense.outputs) != (inputs, outputs) {
            return Err(ExportError::LayerShape {
                layer,
                expected_inputs: inputs,
                expected_outputs: outputs,
                got_inputs: dense.inputs,
                got_outputs: dense.outputs,
            });
        }
        for (part, expected, got) in [
            ("weight", inputs * outputs, dense.weight.len()),
            ("bias", outputs, dense.bias.len()),
        ] {
            if expected != got {
                return Err(ExportError::LayerValues {
                    layer,
                    part,
                    expected,
                    got,
                });
            }
        }
    }
    if standardizer.mean.len() != arch.inputs || standardizer.std.len() != arch.inputs {
        return Err(ExportError::StandardizerLength {
            features: arch.inputs,
            mean: standardizer.mean.len(),
            std: standardizer.std.len(),
        });
    }
    if let Some((feature, &value)) = standardizer
        .std
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        return Err(ExportError::BadDeviation { feature, value });
    }
    if meta.features.len() != arch.inputs {
        return Err(ExportError::FeatureNames {
            expected: arch.inputs,
            got: meta.features.len(),
        });
    }
    Ok(())
}

/// The `metadata_props` entries, kiln's first, every key once.
fn metadata(arch: &Arch, meta: &ExportMeta) -> Result<Vec<StringStringEntryProto>, ExportError> {
    let json = |names: &[String]| serde_json::Value::from(names).to_string();
    let mut entries = vec![
        (
            "kiln.task".to_string(),
            match arch.task {
                Task::Classification { .. } => "classification",
                Task::Regression => "regression",
            }
            .to_string(),
        ),
        ("kiln.features".into(), json(&meta.features)),
    ];
    if let Task::Classification { classes } = &arch.task {
        entries.push(("kiln.classes".into(), json(classes)));
    }
    for (key, value) in [
        ("kiln.label", &meta.label),
        ("kiln.run_id", &meta.run_id),
        ("kiln.dataset", &meta.dataset),
    ] {
        if !value.is_empty() {
            entries.push((key.into(), value.clone()));
        }
    }
    entries.extend(meta.extra.iter().cloned());
    let mut seen = std::collections::BTreeSet::new();
    if let Some((key, _)) = entries.iter().find(|(k, _)| !seen.insert(k.as_str())) {
        return Err(ExportError::DuplicateMetadata(key.clone()));
    }
    Ok(entries
        .into_iter()
        .map(|(key, value)| StringStringEntryProto { key, value })
        .collect())
}

/// Nodes and initializers in the order they are added (which is topological).
#[derive(Default)]
struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

impl Graph {
    /// Adds an f32 constant.
    fn tensor(&mut self, name: &str, dims: &[usize], values: &[f32]) {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            float_data: values.to_vec(),
            name: name.into(),
            ..Default::default()
        });
    }

    /// Adds a node with one output, named after it, and returns that output.
    fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<AttributeProto>,
    ) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: output.into(),
            op_type: op_type.into(),
            attribute,
            ..Default::default()
        });
        output.to_string()
    }

    /// Applies hidden layer `layer`'s activation to `x`; returns the result's name.
    fn activation(&mut self, activation: Activation, x: &str, layer: usize) -> String {
        let out = format!("hidden{layer}");
        match activation {
            Activation::Relu => self.node("Relu", &[x], &out, vec![]),
            Activation::Tanh => self.node("Tanh", &[x], &out, vec![]),
            Activation::Gelu => {
                // gelu(x) = 0.5 · x · (1 + erf(x / √2)); the constants are scalars
                // that broadcast, shared by every layer.
                if !self.initializers.iter().any(|t| t.name == "gelu.sqrt2") {
                    self.tensor("gelu.sqrt2", &[], &[std::f32::consts::SQRT_2]);
                    self.tensor("gelu.one", &[], &[1.0]);
                    self.tensor("gelu.half", &[], &[0.5]);
                }
                let scaled = self.node("Div", &[x, "gelu.sqrt2"], &format!("{out}.scaled"), vec![]);
                let erf = self.node("Erf", &[&scaled], &format!("{out}.erf"), vec![]);
                let shifted = self.node(
                    "Add",
                    &[&erf, "gelu.one"],
                    &format!("{out}.shifted"),
                    vec![],
                );
                let product = self.node("Mul", &[x, &shifted], &format!("{out}.product"), vec![]);
                self.node("Mul", &[&product, "gelu.half"], &out, vec![])
            }
        }
    }
}

fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: value,
        r#type: AttributeType::Int as i32,
        ..Default::default()
    }
}

/// An f32 tensor `[batch, width]` with a symbolic batch.
fn value_info(name: &str, width: usize) -> ValueInfoProto {
    let dim = |value| Dimension {
        value: Some(value),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto {
                    dim: vec![
                        dim(dimension::Value::DimParam(BATCH.into())),
                        dim(dimension::Value::DimValue(width as i64)),
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tract_onnx::prelude::*;

    const FEATURES: usize = 5;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn arch(hidden: Vec<usize>, activation: Activation, task: Task) -> Arch {
        Arch {
            inputs: FEATURES,
            hidden,
            activation,
            task,
        }
    }

    fn classes() -> Task {
        Task::Classification {
            classes: vec!["setosa".into(), "versicolor".into(), "virginica".into()],
        }
    }

    /// Random weights (large enough that activations leave their linear range) and
    /// a standardizer far from the identity.
    fn random(arch: &Arch, rng: &mut StdRng) -> (Vec<Dense>, Standardizer) {
        let flat: Vec<f32> = (0..arch.parameter_count())
            .map(|_| rng.gen_range(-1.5..1.5))
            .collect();
        let standardizer = Standardizer {
            mean: (0..arch.inputs)
                .map(|_| rng.gen_range(-10.0..10.0))
                .collect(),
            std: (0..arch.inputs).map(|_| rng.gen_range(0.2..4.0)).collect(),
        };
        (arch.split(&flat).expect("the right length"), standardizer)
    }

    fn meta() -> ExportMeta {
        ExportMeta {
            features: names("f", FEATURES),
            label: "species".into(),
            run_id: "run-7".into(),
            dataset: "iris@3".into(),
            extra: vec![("owner".into(), "ada".into())],
        }
    }

    /// erf by its Maclaurin series, which is exact to f64 rounding well past the
    /// cut-off where erf is ±1 to 1e-12.
    fn erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let (mut sum, mut power, mut factorial) = (0.0, x, 1.0);
        for n in 0..120 {
            if n > 0 {
                power *= x * x;
                factorial *= n as f64;
            }
            let term = power / (factorial * (2 * n + 1) as f64);
            sum += if n % 2 == 0 { term } else { -term };
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// The network's meaning, written out plainly in f64.
    fn reference(arch: &Arch, layers: &[Dense], s: &Standardizer, x: &[f32]) -> Vec<f64> {
        let mut out = Vec::new();
        for row in x.chunks(arch.inputs) {
            let mut h: Vec<f64> = row
                .iter()
                .enumerate()
                .map(|(j, v)| (f64::from(*v) - f64::from(s.mean[j])) / f64::from(s.std[j]))
                .collect();
            for (i, layer) in layers.iter().enumerate() {
                let mut next: Vec<f64> = (0..layer.outputs)
                    .map(|o| {
                        let w = &layer.weight[o * layer.inputs..(o + 1) * layer.inputs];
                        let dot: f64 = w.iter().zip(&h).map(|(w, h)| f64::from(*w) * h).sum();
                        dot + f64::from(layer.bias[o])
                    })
                    .collect();
                if i + 1 < layers.len() {
                    for v in &mut next {
                        *v = match arch.activation {
                            Activation::Relu => v.max(0.0),
                            Activation::Tanh => v.tanh(),
                            Activation::Gelu => 0.5 * *v * (1.0 + erf(*v / 2f64.sqrt())),
                        };
                    }
                }
                h = next;
            }
            if let Task::Classification { .. } = arch.task {
                let max = h.iter().cloned().fold(f64::MIN, f64::max);
                let sum: f64 = h.iter().map(|v| (v - max).exp()).sum();
                h = h.iter().map(|v| (v - max).exp() / sum).collect();
            }
            out.extend(h);
        }
        out
    }

    fn load(bytes: &[u8]) -> TypedModel {
        tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .expect("tract parses the model")
            .into_optimized()
            .expect("tract optimises the model")
    }

    fn run(plan: &Arc<TypedRunnableModel>, rows: usize, x: &[f32]) -> Vec<f32> {
        let input = Tensor::from_shape(&[rows, FEATURES], x).expect("a tensor");
        let outputs = plan.run(tvec!(input.into())).expect("the model runs");
        let output = outputs[0].to_plain_array_view::<f32>().expect("f32 output");
        output.iter().copied().collect()
    }

    #[test]
    fn tract_computes_what_the_network_means_for_every_activation_and_task() {
        let mut rng = StdRng::seed_from_u64(17);
        for activation in [Activation::Relu, Activation::Tanh, Activation::Gelu] {
            for (task, hidden) in [
                (classes(), vec![8, 6]),
                (Task::Regression, vec![8, 6]),
                (classes(), vec![]),
                (Task::Regression, vec![4]),
            ] {
                let arch = arch(hidden, activation, task);
                let (layers, standardizer) = random(&arch, &mut rng);
                let bytes = export(&arch, &layers, &standardizer, &meta()).expect("export");
                let plan = load(&bytes).into_runnable().expect("a plan");
                for rows in [1, 7] {
                    let x: Vec<f32> = (0..rows * FEATURES)
                        .map(|i| {
                            let j = i % FEATURES;
                            standardizer.mean[j] + standardizer.std[j] * rng.gen_range(-2.5..2.5)
                        })
                        .collect();
                    let got = run(&plan, rows, &x);
                    let want = reference(&arch, &layers, &standardizer, &x);
                    assert_eq!(got.len(), rows * arch.task.outputs());
                    let diff = got
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (f64::from(*g) - w).abs())
                        .fold(0.0, f64::max);
                    assert!(
                        diff <= 1e-5,
                        "{activation:?} {:?} {rows} rows: max diff {diff}",
                        arch.task
                    );
                }
            }
        }
    }

    #[test]
    fn the_graph_has_a_symbolic_batch_and_named_inputs_and_outputs() {
        let mut rng = StdRng::seed_from_u64(3);
        let arch = arch(vec![4], Activation::Gelu, classes());
        let (layers, standardizer) = random(&arch, &mut rng);
        let bytes = export(&arch, &layers, &standardizer, &meta()).expect("export");
        let model = load(&bytes);
        let label = |outlet: OutletId| model.node(outlet.node).name.clone();
        assert_eq!(label(model.input_outlets().expect("inputs")[0]), INPUT);
        let outputs: Vec<String> = model
            .output_outlets()
            .expect("outputs")
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| label(*o))
            })
            .collect();
        assert_eq!(outputs, vec![OUTPUT, LOGITS]);
        let dims = |fact: &TypedFact| fact.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>();
        assert_eq!(dims(model.input_fact(0).expect("input")), vec![BATCH, "5"]);
        assert_eq!(
            model.input_fact(0).expect("input").datum_type,
            f32::datum_type()
        );
        assert_eq!(
            dims(model.output_fact(0).expect("output")),
            vec![BATCH, "3"]
        );
        assert_eq!(
            dims(model.output_fact(1).expect("logits")),
            vec![BATCH, "3"]
        );

        let plan = model.into_runnable().expect("a plan");
        let probabilities = run(&plan, 2, &[0.0; 2 * FEATURES]);
        for row in probabilities.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
        }
    }

    #[test]
    fn the_metadata_names_features_classes_and_provenance() {
        let mut rng = StdRng::seed_from_u64(5);
        let arch = arch(vec![], Activation::Relu, classes());
        let (layers, standardizer) = random(&arch, &mut rng);
        let bytes = export(&arch, &layers, &standardizer, &meta()).expect("export");
        let model = ModelProto::decode(&bytes[..]).expect("our own proto parses it");
        assert_eq!(model.producer_name, "kiln");
        assert_eq!(model.ir_version, IR_VERSION);
        assert_eq!(model.opset_import[0].version, OPSET_VERSION);
        let props: Vec<(&str, &str)> = model
            .metadata_props
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            props,
            vec![
                ("kiln.task", "classification"),
                ("kiln.features", r#"["f0","f1","f2","f3","f4"]"#),
                ("kiln.classes", r#"["setosa","versicolor","virginica"]"#),
                ("kiln.label", "species"),
                ("kiln.run_id", "run-7"),
                ("kiln.dataset", "iris@3"),
                ("owner", "ada"),
            ]
        );

        // tract sees them too, which is how a server will read them.
        let inference = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .expect("tract parses the model");
        let classes = inference
            .properties
            .get("onnx.metadata_props.kiln.classes")
            .expect("the classes property");
        let classes = classes.to_plain_array_view::<String>().expect("strings");
        assert_eq!(
            classes.iter().collect::<Vec<_>>(),
            vec![r#"["setosa","versicolor","virginica"]"#]
        );

        let mut twice = meta();
        twice.extra.push(("kiln.label".into(), "other".into()));
        assert_eq!(
            export(&arch, &layers, &standardizer, &twice),
            Err(ExportError::DuplicateMetadata("kiln.label".into()))
        );
    }

    #[test]
    fn pieces_that_do_not_fit_the_architecture_are_named() {
        let mut rng = StdRng::seed_from_u64(9);
        let arch = arch(vec![4], Activation::Tanh, Task::Regression);
        let (layers, standardizer) = random(&arch, &mut rng);
        let err = |layers: &[Dense], s: &Standardizer, m: &ExportMeta| {
            export(&arch, layers, s, m).expect_err("a misfit")
        };

        assert_eq!(
            err(&layers[..1], &standardizer, &meta()),
            ExportError::LayerCount {
                expected: 2,
                got: 1
            }
        );
        let mut wide = layers.clone();
        wide[1].inputs = 5;
        let e = err(&wide, &standardizer, &meta());
        assert_eq!(
            e.to_string(),
            "layer 1 is 5→1 but the architecture says 4→1"
        );
        let mut short = layers.clone();
        short[0].bias.pop();
        let e = err(&short, &standardizer, &meta());
        assert_eq!(e.to_string(), "layer 0's bias holds 3 values, not 4");

        let mut s = standardizer.clone();
        s.std.pop();
        let e = err(&layers, &s, &meta());
        assert_eq!(
            e.to_string(),
            "the standardizer has 5 means and 4 deviations for 5 features"
        );
        let mut s = standardizer.clone();
        s.std[2] = 0.0;
        assert_eq!(
            err(&layers, &s, &meta()),
            ExportError::BadDeviation {
                feature: 2,
                value: 0.0
            }
        );

        let mut m = meta();
        m.features.pop();
        assert_eq!(
            err(&layers, &standardizer, &m).to_string(),
            "4 feature names were given for 5 inputs"
        );
    }
}
