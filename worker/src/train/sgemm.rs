//! Single-precision matrix products for the trainer's CPU pass, with an AVX-512
//! kernel of our own.
//!
//! The trainer's step is mostly six matrix products of at most 256 × 256 × 256
//! (the benchmark's MLP; `super::bench`). On those sizes the `gemm` crate that
//! candle calls reached 72-85 GFLOP/s on one core of an AVX-512 EPYC, where
//! PyTorch's MKL reached 105-109; the products were four fifths of the step. This
//! module is the usual blocked product (as in the BLIS papers), sized for them:
//!
//! ```text
//!   C (m × n, row-major)  +=  A (m × k, any strides)  ·  B (k × n, any strides)
//!
//!   for each depth block of KC:              pack B's block into NR-column panels
//!     for each MR-row panel of A (threads):  pack it, then for each B panel:
//!       microkernel: an MR × NR tile of C in 24 zmm registers, KC rank-1 updates
//! ```
//!
//! - The tile is 12 rows × 32 columns: 24 accumulators, two loads of B and twelve
//!   broadcasts of A per depth step, so the FMA units, not the loads, set the pace.
//! - Packing copies A and B once per block whatever their strides, so transposed
//!   operands (the backward pass's `dz·hᵀ` and `Wᵀ·dz`) cost no more than others.
//! - Edge tiles pad the packed panels with zeros and store through column masks.
//! - With several threads (the caller's rayon pool) the row panels are shared out;
//!   B is packed once for all of them.
//!
//! [`supported`] says whether this CPU runs the kernel (AVX-512F, detected once);
//! elsewhere the caller uses candle's product.

#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows of a microkernel tile.
const MR: usize = 12;
// The kernel's unrolled rank-1 update names rows 0 to 11.
const _: () = assert!(MR == 12);
/// Columns of a microkernel tile: two 16-lane registers.
const NR: usize = 32;
/// Depth of one packed block: an A panel (12 KiB) stays in L1 and the B block
/// (up to `KC × NC` values, 512 KiB) in L2.
const KC: usize = 256;
/// Columns of one packed B block.
const NC: usize = 512;

/// Whether this CPU runs the AVX-512 kernel.
pub fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// A read-only matrix: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View<'_> {
    /// Whether every element's index is inside `data`.
    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .zip((self.cols - 1).checked_mul(self.col_stride))
            .and_then(|(r, c)| r.checked_add(c));
        last.is_some_and(|last| last < self.data.len())
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// Why a product was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("a {m}×{k} matrix times a {k2}×{n} one: inner sizes differ")]
    Inner {
        m: usize,
        k: usize,
        k2: usize,
        n: usize,
    },
    #[error("the product is {m}×{n} = {want} values; the output holds {got}")]
    Output {
        m: usize,
        n: usize,
        want: usize,
        got: usize,
    },
    #[error("a view's strides reach past its data")]
    Strides,
    #[error("this CPU lacks AVX-512F")]
    Unsupported,
}

/// Computes `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major
/// `a.rows × b.cols`, on the current rayon pool's threads when `parallel`.
pub fn matmul(
    c: &mut [f32],
    a: View<'_>,
    b: View<'_>,
    accumulate: bool,
    parallel: bool,
) -> Result<(), ShapeError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(ShapeError::Inner {
            m,
            k,
            k2: b.rows,
            n,
        });
    }
    if c.len() != m * n {
        return Err(ShapeError::Output {
            m,
            n,
            want: m * n,
            got: c.len(),
        });
    }
    if !a.fits() || !b.fits() {
        return Err(ShapeError::Strides);
    }
    if !supported() {
        return Err(ShapeError::Unsupported);
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    let mut packed_b = vec![0f32; NC.min(n.next_multiple_of(NR)) * KC.min(k)];
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let panels = nc.div_ceil(NR);
            let packed_b = &mut packed_b[..panels * NR * kc];
            pack_b(packed_b, &b, pc, kc, jc, nc);
            let add = accumulate || pc > 0;
            let packed_b = &*packed_b;
            let panel = |(ip, rows): (usize, &mut [f32])| {
                let mut packed_a = [0f32; MR * KC];
                let i0 = ip * MR;
                let mr = MR.min(m - i0);
                pack_a(&mut packed_a[..MR * kc], &a, i0, mr, pc, kc);
                for jp in 0..panels {
                    let j0 = jc + jp * NR;
                    let cols = NR.min(n - j0);
                    let b_panel = &packed_b[jp * NR * kc..(jp + 1) * NR * kc];
                    // SAFETY: `supported()` checked AVX-512F; the panels hold
                    // `MR × kc` and `NR × kc` values; the tile's `mr` rows of
                    // `cols` values from column `j0` lie inside `rows` (row-major,
                    // `n` per row).
                    unsafe {
                        kernel(
                            kc,
                            packed_a.as_ptr(),
                            b_panel.as_ptr(),
                            rows.as_mut_ptr().add(j0),
                            n,
                            mr,
                            cols,
                            add,
                        );
                    }
                }
            };
            if parallel && m > MR {
                c.par_chunks_mut(MR * n).enumerate().for_each(panel);
            } else {
                c.chunks_mut(MR * n).enumerate().for_each(panel);
            }
        }
    }
    Ok(())
}

/// Copies rows `i0..i0 + mr` and depths `pc..pc + kc` of `a` into `out` in the
/// kernel's order, `out[p * MR + i]`, padding missing rows with zeros.
fn pack_a(out: &mut [f32], a: &View<'_>, i0: usize, mr: usize, pc: usize, kc: usize) {
    if mr < MR {
        out.fill(0.0);
    }
    if a.col_stride == 1 {
        // Row-major: read each row's run of depths, write it down a column.
        for i in 0..mr {
            let start = (i0 + i) * a.row_stride + pc;
            for (p, &value) in a.data[start..start + kc].iter().enumerate() {
                out[p * MR + i] = value;
            }
        }
    } else if a.row_stride == 1 {
        // Transposed: each depth's rows are one run.
        for p in 0..kc {
            let start = (pc + p) * a.col_stride + i0;
            out[p * MR..p * MR + mr].copy_from_slice(&a.data[start..start + mr]);
        }
    } else {
        for p in 0..kc {
            for i in 0..mr {
                out[p * MR + i] = a.at(i0 + i, pc + p);
            }
        }
    }
}

/// Copies depths `pc..pc + kc` and columns `jc..jc + nc` of `b` into `out` as
/// `NR`-column panels, `out[panel * NR * kc + p * NR + j]`, padding with zeros.
fn pack_b(out: &mut [f32], b: &View<'_>, pc: usize, kc: usize, jc: usize, nc: usize) {
    for (panel, chunk) in out.chunks_mut(NR * kc).enumerate() {
        let j0 = jc + panel * NR;
        let cols = NR.min(jc + nc - j0);
        if cols < NR {
            chunk.fill(0.0);
        }
        if b.col_stride == 1 {
            // Row-major: each depth's columns are one run.
            for p in 0..kc {
                let start = (pc + p) * b.row_stride + j0;
                chunk[p * NR..p * NR + cols].copy_from_slice(&b.data[start..start + cols]);
            }
        } else if b.row_stride == 1 {
            // Transposed: read each column's run of depths, write it down.
            for j in 0..cols {
                let start = (j0 + j) * b.col_stride + pc;
                for (p, &value) in b.data[start..start + kc].iter().enumerate() {
                    chunk[p * NR + j] = value;
                }
            }
        } else {
            for p in 0..kc {
                for j in 0..cols {
                    chunk[p * NR + j] = b.at(pc + p, j0 + j);
                }
            }
        }
    }
}

/// One `MR × NR` tile: `c[i][j] (+)= Σ_p a[p][i] · b[p][j]` for the first `rows`
/// rows and `cols` columns, `c` row-major with `ldc` values per row.
///
/// # Safety
/// The CPU has AVX-512F; `a` holds `MR × kc` values and `b` `NR × kc`; `c`'s
/// `rows` rows of `cols` values, `ldc` apart, are writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    // Every accumulator is named by a constant index, so that all 24 stay in
    // registers: a loop over rows with a run-time bound would put them in memory.
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (mut a_p, mut b_p) = (a, b);
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(b_p);
        let b1 = _mm512_loadu_ps(b_p.add(16));
        macro_rules! rank1 {
            ($($i:literal)*) => {$(
                let ai = _mm512_set1_ps(*a_p.add($i));
                acc[$i][0] = _mm512_fmadd_ps(ai, b0, acc[$i][0]);
                acc[$i][1] = _mm512_fmadd_ps(ai, b1, acc[$i][1]);
            )*};
        }
        rank1!(0 1 2 3 4 5 6 7 8 9 10 11);
        a_p = a_p.add(MR);
        b_p = b_p.add(NR);
    }
    let mut tile = [0f32; MR * NR];
    let t = tile.as_mut_ptr();
    macro_rules! spill {
        ($($i:literal)*) => {$(
            _mm512_storeu_ps(t.add($i * NR), acc[$i][0]);
            _mm512_storeu_ps(t.add($i * NR + 16), acc[$i][1]);
        )*};
    }
    spill!(0 1 2 3 4 5 6 7 8 9 10 11);
    let mask = |from: usize| -> __mmask16 {
        let n = cols.saturating_sub(from).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    let (m0, m1) = (mask(0), mask(16));
    for i in 0..rows {
        let out = c.add(i * ldc);
        // Masked-off lanes are never touched, so the second half's address may
        // lie past the row's end.
        let upper = out.wrapping_add(16);
        let mut v0 = _mm512_loadu_ps(t.add(i * NR));
        let mut v1 = _mm512_loadu_ps(t.add(i * NR + 16));
        if accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, out));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, upper));
        }
        _mm512_mask_storeu_ps(out, m0, v0);
        _mm512_mask_storeu_ps(upper, m1, v1);
    }
}

/// Never called: `matmul` refuses before reaching the kernel where AVX-512F is
/// not compiled in.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    _kc: usize,
    _a: *const f32,
    _b: *const f32,
    _c: *mut f32,
    _ldc: usize,
    _rows: usize,
    _cols: usize,
    _accumulate: bool,
) {
    unreachable!("the AVX-512 kernel on a CPU without it")
}

/// `a · b` for two 2-D f32 CPU tensors: with [`matmul`] where [`supported`]
/// (its backward runs the same kernel), else candle's `matmul`.
pub fn product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let ours = supported()
        && a.rank() == 2
        && b.rank() == 2
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.device().is_cpu()
        && b.device().is_cpu();
    if ours {
        a.apply_op2(b, Product)
    } else {
        a.matmul(b)
    }
}

/// [`matmul`] as a candle operation.
struct Product;

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "kiln-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = view(s1, l1)?;
        let b = view(s2, l2)?;
        let mut c = vec![0f32; a.rows * b.cols];
        matmul(&mut c, a, b, false, super::model::threads() > 1)
            .map_err(|e| candle_core::Error::msg(format!("kiln-matmul: {e}")))?;
        Ok((CpuStorage::F32(c), Shape::from((a.rows, b.cols))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d(a·b) = grad·bᵀ for a and aᵀ·grad for b; the transposes are views.
        let da = grad.apply_op2_no_bwd(&b.t()?, &Product)?;
        let db = a.t()?.apply_op2_no_bwd(grad, &Product)?;
        Ok((Some(da), Some(db)))
    }
}

/// The 2-D f32 matrix a storage and layout hold.
fn view<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<View<'a>> {
    let CpuStorage::F32(values) = storage else {
        return Err(candle_core::Error::msg("kiln-matmul takes f32 values"));
    };
    let (rows, cols) = layout.shape().dims2()?;
    let stride = layout.stride();
    Ok(View {
        data: values
            .get(layout.start_offset()..)
            .ok_or_else(|| candle_core::Error::msg("kiln-matmul: offset past the data"))?,
        rows,
        cols,
        row_stride: stride[0],
        col_stride: stride[1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// `a` as a view, stored row-major or transposed (column-major).
    fn stored(values: &[f32], rows: usize, cols: usize, transposed: bool) -> View<'_> {
        let (row_stride, col_stride) = if transposed { (1, rows) } else { (cols, 1) };
        View {
            data: values,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    fn naive(a: &View<'_>, b: &View<'_>) -> Vec<f64> {
        let mut c = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|p| f64::from(a.at(i, p)) * f64::from(b.at(p, j)))
                    .sum();
            }
        }
        c
    }

    fn assert_near(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        // Each value sums k products of values below 1 in magnitude.
        let tolerance = 1e-5 * (k as f64).sqrt().max(1.0) * 4.0;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= tolerance,
                "{what}: value {i} is {g}, want {w}"
            );
        }
    }

    #[test]
    fn products_match_the_textbook_sum_on_every_edge_and_layout() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX-512F; candle's product is used");
            return;
        }
        let mut rng = StdRng::seed_from_u64(3);
        let sizes = [1, 5, 12, 13, 31, 32, 33, 64, 255, 257, 530];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        for (case, &(m, k, n)) in [
            (1, 1, 1),
            (12, 256, 32),
            (13, 257, 33),
            (256, 64, 256),
            (10, 256, 256),
            (256, 10, 256),
            (256, 256, 64),
            (5, 530, 31),
            (33, 5, 530),
        ]
        .iter()
        .chain(
            sizes
                .iter()
                .map(|s| (*s, *s, *s))
                .collect::<Vec<_>>()
                .iter(),
        )
        .enumerate()
        {
            let a_values = random(m * k, &mut rng);
            let b_values = random(k * n, &mut rng);
            let start = random(m * n, &mut rng);
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = stored(&a_values, m, k, ta);
                let b = stored(&b_values, k, n, tb);
                let want = naive(&a, &b);
                let what = format!("case {case}: {m}×{k}·{k}×{n}, transposed {ta}/{tb}");
                let mut c = vec![f32::NAN; m * n];
                matmul(&mut c, a, b, false, false).expect("product");
                assert_near(&c, &want, k, &what);
                // The same on two threads, adding to what is there.
                let mut c = start.clone();
                pool.install(|| matmul(&mut c, a, b, true, true))
                    .expect("product");
                let want: Vec<f64> = want
                    .iter()
                    .zip(&start)
                    .map(|(w, s)| w + f64::from(*s))
                    .collect();
                assert_near(&c, &want, k, &format!("{what}, accumulated"));
            }
        }
    }

    #[test]
    fn bad_shapes_are_refused_with_the_sizes() {
        let six = [0f32; 6];
        let view = |rows, cols| View {
            data: &six,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        };
        let mut c = vec![0f32; 4];
        let err = matmul(&mut c, view(2, 3), view(2, 3), false, false).expect_err("inner");
        assert_eq!(
            err.to_string(),
            "a 2×3 matrix times a 2×3 one: inner sizes differ"
        );
        let mut short = vec![0f32; 3];
        let err = matmul(&mut short, view(2, 3), view(3, 2), false, false).expect_err("output");
        assert_eq!(
            err.to_string(),
            "the product is 2×2 = 4 values; the output holds 3"
        );
        // Two rows of four, four apart, need eight values.
        let mut two = vec![0f32; 2];
        let err = matmul(&mut two, view(2, 4), view(4, 1), false, false).expect_err("strides");
        assert_eq!(err, ShapeError::Strides);
    }

    #[test]
    fn the_candle_operation_gives_candle_s_product_and_gradients() {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(5);
        let (m, k, n) = (37, 70, 45);
        let a = Var::from_slice(&random(m * k, &mut rng), (m, k), &dev).expect("a");
        // b is used transposed, as the trainer's first layer uses the features.
        let b = Var::from_slice(&random(n * k, &mut rng), (n, k), &dev).expect("b");
        let weights = Tensor::from_slice(&random(m * n, &mut rng), (m, n), &dev).expect("w");
        let run = |ours: bool| {
            let bt = b.t().expect("t");
            let c = if ours {
                product(&a, &bt)
            } else {
                a.matmul(&bt)
            }
            .expect("product");
            let loss = (c.clone() * &weights).expect("mul").sum_all().expect("sum");
            let grads = loss.backward().expect("backward");
            let flat = |t: &Tensor| {
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("flat")
            };
            (
                flat(&c),
                flat(grads.get(&a).expect("grad a")),
                flat(grads.get(&b).expect("grad b")),
            )
        };
        let (ours, theirs) = (run(true), run(false));
        for (what, got, want) in [
            ("product", &ours.0, &theirs.0),
            ("grad a", &ours.1, &theirs.1),
            ("grad b", &ours.2, &theirs.2),
        ] {
            let want: Vec<f64> = want.iter().map(|v| f64::from(*v)).collect();
            assert_near(got, &want, k, what);
        }
    }
}
