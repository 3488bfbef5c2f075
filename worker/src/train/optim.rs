//! Optimizers over flat parameter buffers, with state that checkpoints and resumes
//! exactly.
//!
//! A shard keeps its parameters and their gradients as flat `f32` buffers in a
//! fixed order (the same order on every rank, so that one all-reduce averages the
//! whole gradient). The optimizers here update those buffers in place, with the
//! semantics of PyTorch's `torch.optim.SGD` (momentum, dampening 0, coupled weight
//! decay) and `torch.optim.AdamW` (decoupled weight decay, bias-corrected
//! moments). candle's own AdamW keeps its moments private, so a checkpoint could
//! not hold them; these expose theirs as [`OptimizerState`].
//!
//! Resuming is exact: the state is the step count and the moment buffers, and
//! restoring them and running on gives bit-identical parameters to never having
//! stopped.

use std::collections::BTreeMap;

use kiln_common::jobspec::{OptimizerKind, OptimizerSpec};

/// AdamW's moment decay rates and epsilon (PyTorch's defaults).
pub const ADAM_BETA1: f32 = 0.9;
pub const ADAM_BETA2: f32 = 0.999;
pub const ADAM_EPS: f32 = 1e-8;

/// What an optimizer must keep to resume: its step count and named buffers, each
/// as long as the parameters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OptimizerState {
    pub step: u64,
    pub buffers: BTreeMap<String, Vec<f32>>,
}

/// Why an optimizer call failed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptimError {
    #[error("{what} has {got} values; the parameters have {want}")]
    Length {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("the checkpointed optimizer state lacks the buffer {0}")]
    MissingBuffer(&'static str),
}

/// An optimizer over one flat parameter buffer.
#[derive(Debug, Clone)]
pub struct Optimizer {
    spec: OptimizerSpec,
    step: u64,
    /// SGD: the momentum buffer. AdamW: the first moment.
    first: Vec<f32>,
    /// AdamW: the second moment (empty for SGD).
    second: Vec<f32>,
}

fn check(what: &'static str, got: usize, want: usize) -> Result<(), OptimError> {
    if got == want {
        Ok(())
    } else {
        Err(OptimError::Length { what, got, want })
    }
}

impl Optimizer {
    /// Makes an optimizer for `len` parameters.
    pub fn new(spec: &OptimizerSpec, len: usize) -> Optimizer {
        let second = match spec.kind {
            OptimizerKind::Adamw => vec![0.0; len],
            OptimizerKind::Sgd => Vec::new(),
        };
        Optimizer {
            spec: spec.clone(),
            step: 0,
            first: vec![0.0; len],
            second,
        }
    }

    /// Returns the steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Updates `params` in place with `grads` (already averaged across shards).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) -> Result<(), OptimError> {
        check("the gradient", grads.len(), params.len())?;
        check("the optimizer state", self.first.len(), params.len())?;
        self.step += 1;
        let lr = self.spec.lr as f32;
        let wd = self.spec.weight_decay as f32;
        match self.spec.kind {
            OptimizerKind::Sgd => {
                let momentum = self.spec.momentum as f32;
                for ((p, g), buf) in params.iter_mut().zip(grads).zip(&mut self.first) {
                    let mut d = *g + wd * *p;
                    if momentum != 0.0 {
                        // PyTorch: the first step starts the buffer at the gradient.
                        *buf = if self.step == 1 {
                            d
                        } else {
                            momentum * *buf + d
                        };
                        d = *buf;
                    }
                    *p -= lr * d;
                }
            }
            OptimizerKind::Adamw => {
                let t = self.step as i32;
                let update = AdamW {
                    lr,
                    wd,
                    c1: 1.0 - ADAM_BETA1.powi(t),
                    c2: 1.0 - ADAM_BETA2.powi(t),
                };
                update.apply(params, grads, &mut self.first, &mut self.second);
            }
        }
        Ok(())
    }

    /// Returns the state a checkpoint keeps.
    pub fn state(&self) -> OptimizerState {
        let mut buffers = BTreeMap::new();
        match self.spec.kind {
            OptimizerKind::Sgd => {
                buffers.insert("momentum".to_string(), self.first.clone());
            }
            OptimizerKind::Adamw => {
                buffers.insert("exp_avg".to_string(), self.first.clone());
                buffers.insert("exp_avg_sq".to_string(), self.second.clone());
            }
        }
        OptimizerState {
            step: self.step,
            buffers,
        }
    }

    /// Makes an optimizer for `len` parameters from a checkpointed state.
    pub fn restore(
        spec: &OptimizerSpec,
        len: usize,
        state: &OptimizerState,
    ) -> Result<Optimizer, OptimError> {
        let take = |name: &'static str| -> Result<Vec<f32>, OptimError> {
            let buf = state
                .buffers
                .get(name)
                .ok_or(OptimError::MissingBuffer(name))?;
            check(name, buf.len(), len)?;
            Ok(buf.clone())
        };
        let (first, second) = match spec.kind {
            OptimizerKind::Sgd => (take("momentum")?, Vec::new()),
            OptimizerKind::Adamw => (take("exp_avg")?, take("exp_avg_sq")?),
        };
        Ok(Optimizer {
            spec: spec.clone(),
            step: state.step,
            first,
            second,
        })
    }
}

/// One AdamW update's constants (PyTorch's `torch.optim.AdamW`, decoupled weight
/// decay, bias-corrected moments).
struct AdamW {
    lr: f32,
    wd: f32,
    /// Bias corrections `1 - β₁ᵗ` and `1 - β₂ᵗ`.
    c1: f32,
    c2: f32,
}

impl AdamW {
    /// Updates every parameter and both moments. Where the CPU has AVX-512F the
    /// same loop is compiled for it: 16 values per instruction instead of the
    /// baseline's 4, a twentieth of the benchmark's step before. Division and
    /// square root round exactly either way, so both give the same bits.
    fn apply(&self, params: &mut [f32], grads: &[f32], first: &mut [f32], second: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::sgemm::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked at run time).
            #[allow(unsafe_code)]
            unsafe {
                return self.apply_avx512(params, grads, first, second);
            }
        }
        self.apply_portable(params, grads, first, second);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    unsafe fn apply_avx512(
        &self,
        params: &mut [f32],
        grads: &[f32],
        first: &mut [f32],
        second: &mut [f32],
    ) {
        self.apply_portable(params, grads, first, second);
    }

    #[inline(always)]
    fn apply_portable(
        &self,
        params: &mut [f32],
        grads: &[f32],
        first: &mut [f32],
        second: &mut [f32],
    ) {
        let decay = 1.0 - self.lr * self.wd;
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(first).zip(second) {
            *p *= decay;
            *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * *g;
            *v = ADAM_BETA2 * *v + (1.0 - ADAM_BETA2) * *g * *g;
            let m_hat = *m / self.c1;
            let v_hat = *v / self.c2;
            *p -= self.lr * m_hat / (v_hat.sqrt() + ADAM_EPS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: OptimizerKind, lr: f64, momentum: f64, weight_decay: f64) -> OptimizerSpec {
        OptimizerSpec {
            kind,
            lr,
            momentum,
            weight_decay,
        }
    }

    #[test]
    fn sgd_with_momentum_matches_pytorch() {
        // torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01), p = [1, -2],
        // grad = [0.5, 0.25] on both steps.
        let mut opt = Optimizer::new(&spec(OptimizerKind::Sgd, 0.1, 0.9, 0.01), 2);
        let mut p = [1.0f32, -2.0];
        opt.step(&mut p, &[0.5, 0.25]).expect("step");
        // d = g + wd p = [0.51, 0.23]; buf = d; p -= 0.1 d
        assert!(
            (p[0] - 0.949).abs() < 1e-6 && (p[1] + 2.023).abs() < 1e-6,
            "{p:?}"
        );
        opt.step(&mut p, &[0.5, 0.25]).expect("step");
        // d = [0.5 + 0.00949, 0.25 - 0.02023]; buf = 0.9 [0.51, 0.23] + d
        let buf0 = 0.9 * 0.51 + 0.509_49;
        let buf1 = 0.9 * 0.23 + 0.229_77;
        assert!((p[0] - (0.949 - 0.1 * buf0)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-2.023 - 0.1 * buf1)).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        // At t = 1 the bias-corrected step is lr * g / (|g| + eps): sign(g) * lr.
        let mut opt = Optimizer::new(&spec(OptimizerKind::Adamw, 0.01, 0.0, 0.1), 3);
        let mut p = [1.0f32, -1.0, 0.0];
        opt.step(&mut p, &[2.0, -0.5, 0.0]).expect("step");
        let decayed = 1.0 - 0.01 * 0.1;
        assert!((p[0] - (decayed - 0.01)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-decayed + 0.01)).abs() < 1e-6, "{p:?}");
        assert_eq!(p[2], 0.0, "a zero gradient moves nothing");
    }

    #[test]
    fn a_restored_optimizer_continues_bit_identically() {
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adamw] {
            let s = spec(
                kind,
                0.05,
                if kind == OptimizerKind::Sgd { 0.9 } else { 0.0 },
                0.01,
            );
            let grads = |step: usize| -> Vec<f32> {
                (0..100)
                    .map(|i| ((i * 7 + step * 13) % 17) as f32 / 17.0 - 0.5)
                    .collect()
            };
            let mut straight = Optimizer::new(&s, 100);
            let mut p_straight: Vec<f32> = (0..100).map(|i| i as f32 / 100.0).collect();
            for step in 0..20 {
                straight.step(&mut p_straight, &grads(step)).expect("step");
            }

            let mut first = Optimizer::new(&s, 100);
            let mut p: Vec<f32> = (0..100).map(|i| i as f32 / 100.0).collect();
            for step in 0..8 {
                first.step(&mut p, &grads(step)).expect("step");
            }
            let saved = first.state();
            drop(first);
            let mut resumed = Optimizer::restore(&s, 100, &saved).expect("restore");
            assert_eq!(resumed.steps(), 8);
            for step in 8..20 {
                resumed.step(&mut p, &grads(step)).expect("step");
            }
            assert_eq!(p, p_straight, "{kind:?} resumed differently");
        }
    }

    #[test]
    fn mismatched_buffers_are_errors() {
        let s = spec(OptimizerKind::Adamw, 0.01, 0.0, 0.0);
        let mut opt = Optimizer::new(&s, 2);
        let mut p = [0.0f32; 2];
        assert!(matches!(
            opt.step(&mut p, &[1.0]),
            Err(OptimError::Length { .. })
        ));
        let mut state = opt.state();
        state.buffers.remove("exp_avg_sq");
        assert_eq!(
            Optimizer::restore(&s, 2, &state).expect_err("missing"),
            OptimError::MissingBuffer("exp_avg_sq")
        );
        assert!(
            Optimizer::restore(&s, 3, &opt.state()).is_err(),
            "wrong length"
        );
    }
}
