//! Single-precision matrix products for the trainer's CPU pass, with AVX-512 and
//! AVX2 kernels of our own.
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
//!       microkernel: an MR × NR tile of C in registers, KC rank-1 updates
//! ```
//!
//! - The AVX-512 tile is 12 rows × 32 columns: 24 accumulators, two loads of B
//!   and twelve broadcasts of A per depth step, so the FMA units, not the loads,
//!   set the pace. The AVX2 tile (with FMA) is 6 × 16: 12 of its 16 registers.
//! - Packing copies A and B once per block whatever their strides, so transposed
//!   operands (the backward pass's `dz·hᵀ` and `Wᵀ·dz`) cost no more than others.
//! - Edge tiles pad the packed panels with zeros and store only their valid part.
//! - With several threads (the caller's rayon pool) the row panels are shared out;
//!   B is packed once for all of them.
//!
//! [`best`] picks the kernel this CPU runs (detected once); where neither runs,
//! [`product`] uses candle's.

#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Most rows of a microkernel tile (AVX-512's).
const MAX_MR: usize = 12;
const _: () = assert!(Isa::Avx512.tile().0 <= MAX_MR && Isa::Avx2.tile().0 <= MAX_MR);
/// Depth of one packed block: an A panel (12 KiB) stays in L1 and the B block
/// (up to `KC × NC` values, 512 KiB) in L2.
const KC: usize = 256;
/// Columns of one packed B block.
const NC: usize = 512;

/// The instruction sets a kernel is written for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: a 12 × 32 tile in 24 of the 32 zmm registers.
    Avx512,
    /// AVX2 with FMA: a 6 × 16 tile in 12 of the 16 ymm registers.
    Avx2,
}

impl Isa {
    /// Rows and columns of its tile.
    const fn tile(self) -> (usize, usize) {
        match self {
            Isa::Avx512 => (12, 32),
            Isa::Avx2 => (6, 16),
        }
    }

    /// Whether this CPU runs it.
    fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Isa::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }
}

/// The best kernel this CPU runs (detected once), or none.
pub fn best() -> Option<Isa> {
    static BEST: OnceLock<Option<Isa>> = OnceLock::new();
    *BEST.get_or_init(|| {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.available())
    })
}

/// Whether this CPU runs one of the kernels.
pub fn supported() -> bool {
    best().is_some()
}

/// Whether this CPU has AVX-512F.
pub fn has_avx512() -> bool {
    best() == Some(Isa::Avx512)
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

    /// The same values, rows and columns swapped.
    fn transposed(&self) -> View<'_> {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
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
    #[error("a {m}×{n} product has more values than memory can address")]
    TooLarge { m: usize, n: usize },
    #[error("this CPU has neither AVX-512F nor AVX2 with FMA")]
    Unsupported,
}

/// Computes `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major
/// `a.rows × b.cols`, on the current rayon pool's threads when `parallel`, with
/// the best kernel this CPU runs.
pub fn matmul(
    c: &mut [f32],
    a: View<'_>,
    b: View<'_>,
    accumulate: bool,
    parallel: bool,
) -> Result<(), ShapeError> {
    matmul_with(
        best().ok_or(ShapeError::Unsupported)?,
        c,
        a,
        b,
        accumulate,
        parallel,
    )
}

/// [`matmul`] with a given kernel.
fn matmul_with(
    isa: Isa,
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
    // Zero strides let a small buffer back a huge view: the product's size is
    // checked, not assumed to fit.
    let want = m.checked_mul(n).ok_or(ShapeError::TooLarge { m, n })?;
    if c.len() != want {
        return Err(ShapeError::Output {
            m,
            n,
            want,
            got: c.len(),
        });
    }
    if !a.fits() || !b.fits() {
        return Err(ShapeError::Strides);
    }
    if !isa.available() {
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
    // Each tile's sizes are constants in its own copy of the loops: packing with
    // run-time sizes cost a tenth of the benchmark's step.
    const AVX512: (usize, usize) = Isa::Avx512.tile();
    const AVX2: (usize, usize) = Isa::Avx2.tile();
    match isa {
        Isa::Avx512 => blocked::<{ AVX512.0 }, { AVX512.1 }>(isa, c, a, b, accumulate, parallel),
        Isa::Avx2 => blocked::<{ AVX2.0 }, { AVX2.1 }>(isa, c, a, b, accumulate, parallel),
    }
    Ok(())
}

/// The blocked product of checked, non-empty operands with `isa`'s `MR × NR`
/// tile.
fn blocked<const MR: usize, const NR: usize>(
    isa: Isa,
    c: &mut [f32],
    a: View<'_>,
    b: View<'_>,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut packed_b = vec![0f32; NC.min(n.next_multiple_of(NR)) * KC.min(k)];
    let a_t = a.transposed();
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let panels = nc.div_ceil(NR);
            // B's block as `NR`-column panels, `[panel][p][j]`.
            let packed_b = &mut packed_b[..panels * NR * kc];
            for (jp, chunk) in packed_b.chunks_mut(NR * kc).enumerate() {
                let j0 = jc + jp * NR;
                pack_panel::<NR>(chunk, &b, pc, kc, j0, NR.min(n - j0));
            }
            let add = accumulate || pc > 0;
            let packed_b = &*packed_b;
            let panel = |(ip, rows): (usize, &mut [f32])| {
                let mut packed_a = [0f32; MAX_MR * KC];
                let i0 = ip * MR;
                let mr = MR.min(m - i0);
                // A's rows as the kernel reads them, `packed_a[p * MR + i]`: a
                // panel of A's transpose.
                pack_panel::<MR>(&mut packed_a[..MR * kc], &a_t, pc, kc, i0, mr);
                for jp in 0..panels {
                    let j0 = jc + jp * NR;
                    let cols = NR.min(n - j0);
                    let b_panel = &packed_b[jp * NR * kc..(jp + 1) * NR * kc];
                    // SAFETY: `isa.available()` checked the CPU; the panels hold
                    // a tile's rows × kc and columns × kc values; the tile's `mr`
                    // rows of `cols` values from column `j0` lie inside `rows`
                    // (row-major, `n` per row).
                    unsafe {
                        let job = Tile {
                            kc,
                            a: packed_a.as_ptr(),
                            b: b_panel.as_ptr(),
                            c: rows.as_mut_ptr().add(j0),
                            ldc: n,
                            rows: mr,
                            cols,
                            accumulate: add,
                        };
                        tile(isa, &job);
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
}

/// Copies rows `pc..pc + kc` and columns `j0..j0 + cols` of `v` into `out`,
/// `out[p * W + j]`, padding the columns past `cols` with zeros.
fn pack_panel<const W: usize>(
    out: &mut [f32],
    v: &View<'_>,
    pc: usize,
    kc: usize,
    j0: usize,
    cols: usize,
) {
    if cols < W {
        out.fill(0.0);
    }
    if v.col_stride == 1 {
        // Each row's columns are one run.
        for p in 0..kc {
            let start = (pc + p) * v.row_stride + j0;
            out[p * W..p * W + cols].copy_from_slice(&v.data[start..start + cols]);
        }
    } else if v.row_stride == 1 {
        // Each column's rows are one run: read it, write it down the panel.
        for j in 0..cols {
            let start = (j0 + j) * v.col_stride + pc;
            for (p, &value) in v.data[start..start + kc].iter().enumerate() {
                out[p * W + j] = value;
            }
        }
    } else {
        for p in 0..kc {
            for j in 0..cols {
                out[p * W + j] = v.at(pc + p, j0 + j);
            }
        }
    }
}

/// One tile of `isa`'s kernel: `c[i][j] (+)= Σ_p a[p][i] · b[p][j]` for the
/// first `rows` rows and `cols` columns, `c` row-major with `ldc` values per row.
///
/// # Safety
/// The CPU runs `isa`; `a` holds the tile's rows × `kc` values and `b` its
/// columns × `kc`; `c`'s `rows` rows of `cols` values, `ldc` apart, are writable.
unsafe fn tile(isa: Isa, job: &Tile) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => avx512(job),
        Isa::Avx2 => avx2(job),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, job);
        unreachable!("no kernel runs on this architecture");
    }
}

/// One tile's work: `kc` rank-1 updates from the packed panels `a` and `b`, into
/// the first `rows` rows and `cols` columns at `c` (row-major, `ldc` per row),
/// added to what is there with `accumulate`.
#[derive(Clone, Copy)]
struct Tile {
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
}

/// Defines a tile kernel from its instruction set's intrinsics: the rank-1
/// updates into two registers per row, then the tile through memory into `c`.
///
/// Every accumulator is named by a constant row index, so that all stay in
/// registers: a loop over rows with a run-time bound would put them in memory.
macro_rules! tile_kernel {
    (
        $(#[$doc:meta])*
        $name:ident, $feature:literal, $isa:expr, $lanes:literal,
        $zero:ident, $load:ident, $set1:ident, $fma:ident, $store:ident,
        rows: $($row:literal)*
    ) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// As [`tile`], on a CPU with this instruction set.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(job: &Tile) {
            use std::arch::x86_64::*;
            let Tile { kc, a, b, c, ldc, rows, cols, accumulate } = *job;
            const MR: usize = $isa.tile().0;
            const NR: usize = $isa.tile().1;
            const _: () = assert!(NR == 2 * $lanes && MR == [$($row),*].len());
            let mut acc = [[$zero(); 2]; MR];
            let (mut a_p, mut b_p) = (a, b);
            for _ in 0..kc {
                let b0 = $load(b_p);
                let b1 = $load(b_p.add($lanes));
                $(
                    let ai = $set1(*a_p.add($row));
                    acc[$row][0] = $fma(ai, b0, acc[$row][0]);
                    acc[$row][1] = $fma(ai, b1, acc[$row][1]);
                )*
                a_p = a_p.add(MR);
                b_p = b_p.add(NR);
            }
            let mut tile = [0f32; MR * NR];
            let t = tile.as_mut_ptr();
            $(
                $store(t.add($row * NR), acc[$row][0]);
                $store(t.add($row * NR + $lanes), acc[$row][1]);
            )*
            store_tile::<NR>(&tile, c, ldc, rows, cols, accumulate);
        }
    };
}

tile_kernel!(
    /// The AVX-512 tile, 12 × 32.
    avx512, "avx512f", Isa::Avx512, 16,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps,
    rows: 0 1 2 3 4 5 6 7 8 9 10 11
);

tile_kernel!(
    /// The AVX2 tile, 6 × 16 (the shape BLIS uses on Haswell).
    avx2, "avx2,fma", Isa::Avx2, 8,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps,
    rows: 0 1 2 3 4 5
);

/// Writes (or adds) the first `rows` × `cols` values of a computed tile, `NR`
/// per row, into `c`. Inlined into each kernel, so that its loops (of constant
/// length for full rows) become the kernel's vector instructions.
///
/// # Safety
/// `c`'s `rows` rows of `cols` values, `ldc` apart, are writable.
#[inline(always)]
unsafe fn store_tile<const NR: usize>(
    tile: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    for (i, computed) in tile.chunks_exact(NR).take(rows).enumerate() {
        let out = std::slice::from_raw_parts_mut(c.add(i * ldc), cols);
        if let Ok(full) = <&mut [f32; NR]>::try_from(&mut *out) {
            if accumulate {
                for (o, v) in full.iter_mut().zip(computed) {
                    *o += *v;
                }
            } else {
                for (o, v) in full.iter_mut().zip(computed) {
                    *o = *v;
                }
            }
        } else {
            for (o, v) in out.iter_mut().zip(computed) {
                *o = if accumulate { *o + *v } else { *v };
            }
        }
    }
}

/// `a · b` for two 2-D f32 CPU tensors: with [`matmul`] where [`supported`]
/// (its backward runs the same kernels), else candle's `matmul`.
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
        let len = a
            .rows
            .checked_mul(b.cols)
            .ok_or_else(|| candle_core::Error::msg("kiln-matmul: the product is too large"))?;
        let mut c = vec![0f32; len];
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
        let kernels: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|isa| isa.available())
            .collect();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU runs no kernel; candle's product is used");
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
            let layouts = [(false, false), (true, false), (false, true), (true, true)];
            for (isa, (ta, tb)) in kernels
                .iter()
                .flat_map(|isa| layouts.iter().map(move |l| (*isa, *l)))
            {
                let a = stored(&a_values, m, k, ta);
                let b = stored(&b_values, k, n, tb);
                let want = naive(&a, &b);
                let what = format!("{isa:?} case {case}: {m}×{k}·{k}×{n}, transposed {ta}/{tb}");
                let mut c = vec![f32::NAN; m * n];
                matmul_with(isa, &mut c, a, b, false, false).expect("product");
                assert_near(&c, &want, k, &what);
                // The same on two threads, adding to what is there.
                let mut c = start.clone();
                pool.install(|| matmul_with(isa, &mut c, a, b, true, true))
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
        // Zero strides let one value back a view of any size: a product whose
        // size overflows is refused, never written past its output.
        let one = [1f32];
        let huge = View {
            data: &one,
            rows: usize::MAX / 2,
            cols: 1,
            row_stride: 0,
            col_stride: 0,
        };
        let wide = View {
            data: &one,
            rows: 1,
            cols: 3,
            row_stride: 0,
            col_stride: 0,
        };
        let err = matmul(&mut two, huge, wide, false, false).expect_err("too large");
        assert_eq!(
            err,
            ShapeError::TooLarge {
                m: usize::MAX / 2,
                n: 3
            }
        );
    }

    #[test]
    fn the_candle_operation_gives_candle_s_product_and_gradients() {
        if !supported() {
            // `product` is candle's own product here: nothing of ours to compare.
            eprintln!("skipped: this CPU has neither AVX-512F nor AVX2+FMA");
            return;
        }
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
