//! The shape of a trained network, shared by the trainer (`model`), the ONNX export
//! (`onnx`) and checkpoints: a stack of dense layers with one activation between
//! them, and what its output means.

use kiln_common::jobspec::Activation;

/// What the last layer's outputs mean.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Logits over these classes (in this order); the loss is softmax cross-entropy.
    Classification { classes: Vec<String> },
    /// One real value per example; the loss is the mean squared error.
    Regression,
}

impl Task {
    /// Width of the last layer.
    pub fn outputs(&self) -> usize {
        match self {
            Task::Classification { classes } => classes.len(),
            Task::Regression => 1,
        }
    }
}

/// A network: `inputs` features, then `hidden` layers with `activation` after each,
/// then the output layer (no activation; `linear` has no hidden layers).
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub inputs: usize,
    pub hidden: Vec<usize>,
    pub activation: Activation,
    pub task: Task,
}

impl Arch {
    /// `(inputs, outputs)` of every dense layer, first to last.
    pub fn layer_shapes(&self) -> Vec<(usize, usize)> {
        let mut widths = Vec::with_capacity(self.hidden.len() + 2);
        widths.push(self.inputs);
        widths.extend(&self.hidden);
        widths.push(self.task.outputs());
        widths.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Number of trainable values: every layer's weight and bias.
    pub fn parameter_count(&self) -> usize {
        self.layer_shapes().iter().map(|(i, o)| i * o + o).sum()
    }

    /// Where each layer sits in a flat parameter buffer. The flat layout, which
    /// every rank, checkpoint, export and device shares, is each layer in order,
    /// its weight (row-major `[outputs][inputs]`) then its bias.
    pub fn layout(&self) -> Vec<LayerAt> {
        let mut at = 0;
        self.layer_shapes()
            .into_iter()
            .map(|(inputs, outputs)| {
                let weight = at..at + inputs * outputs;
                let bias = weight.end..weight.end + outputs;
                at = bias.end;
                LayerAt {
                    inputs,
                    outputs,
                    weight,
                    bias,
                }
            })
            .collect()
    }

    /// Cuts a flat parameter buffer into layers ([`Arch::layout`]). `None` when
    /// the buffer's length is not [`Arch::parameter_count`].
    pub fn split(&self, flat: &[f32]) -> Option<Vec<Dense>> {
        if flat.len() != self.parameter_count() {
            return None;
        }
        let layers = self
            .layout()
            .into_iter()
            .map(|layer| Dense {
                inputs: layer.inputs,
                outputs: layer.outputs,
                weight: flat[layer.weight].to_vec(),
                bias: flat[layer.bias].to_vec(),
            })
            .collect();
        Some(layers)
    }
}

/// One layer's place in a flat parameter buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerAt {
    pub inputs: usize,
    pub outputs: usize,
    /// The weight's values, `outputs × inputs` row-major.
    pub weight: std::ops::Range<usize>,
    /// The bias's values, `outputs`.
    pub bias: std::ops::Range<usize>,
}

/// One dense layer's values: `y = x · weightᵀ + bias`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    pub inputs: usize,
    pub outputs: usize,
    /// Row-major `[outputs][inputs]` (PyTorch's `nn.Linear` layout).
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_buffer_splits_into_weight_then_bias_per_layer() {
        let arch = Arch {
            inputs: 3,
            hidden: vec![2],
            activation: Activation::Relu,
            task: Task::Classification {
                classes: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            },
        };
        assert_eq!(arch.layer_shapes(), vec![(3, 2), (2, 4)]);
        assert_eq!(arch.parameter_count(), 3 * 2 + 2 + 2 * 4 + 4);
        let flat: Vec<f32> = (0..arch.parameter_count()).map(|i| i as f32).collect();
        let layers = arch.split(&flat).expect("the right length");
        assert_eq!(
            layers[0].weight,
            (0..6).map(|i| i as f32).collect::<Vec<_>>()
        );
        assert_eq!(layers[0].bias, vec![6.0, 7.0]);
        assert_eq!(layers[1].weight.len(), 8);
        assert_eq!(layers[1].bias, vec![16.0, 17.0, 18.0, 19.0]);
        assert!(arch.split(&flat[1..]).is_none());
        let layout = arch.layout();
        assert_eq!(
            (layout[0].weight.clone(), layout[0].bias.clone()),
            (0..6, 6..8)
        );
        assert_eq!(
            (layout[1].weight.clone(), layout[1].bias.clone()),
            (8..16, 16..20)
        );
        assert_eq!((layout[1].inputs, layout[1].outputs), (2, 4));
    }
}
