//! Decoding's products on the CPU: a few rows of f32 activations against a frozen weight whose
//! values are bf16, read as bf16 and accumulated in f32.
//!
//! A decoding step multiplies B rows (B = the number of sequences, 1..=8 typically) by every
//! weight of the model once, so at small B the step is bound by reading the weights, not by
//! arithmetic: f32 weights streamed at ~11.6 GB/s on the 2-core benchmark machine, 5.8 GFLOP/s
//! at B = 1 (BENCHMARKS.md, "CPU decoding"). Qwen2.5's published weights are bf16, so a weight
//! loaded from them into f32 holds bf16 values: a bf16 copy of it holds the *same values* in half
//! the bytes. `Bf16Twin` makes that copy only when the round trip is exact; the kernel widens each
//! value to f32 in registers (bf16 is the high half of an f32) and accumulates in f32, so its
//! result differs from the f32 GEMM by the order of summation alone. Weights that are not
//! bf16-exact (merged adapters, full fine-tuning, random f32 test models) keep the f32 GEMM.
//!
//! Why not gemm's own half-precision paths: its f16 kernels are 2.6x slower than f32 at B = 8
//! and its bf16 path has no vectorised kernel at all (measured, BENCHMARKS.md), and both round
//! the activations too.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, TensorId};
use half::bf16;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// The most activation rows decoding sends to the kernel; larger products (prefill, training)
/// are GEMMs, where gemm's packed kernels win (the crossover was measured with the bench's
/// `micro-decode` case, BENCHMARKS.md).
pub const MAX_ROWS: usize = 32;

/// The most rows the kernel accepts at all (the bench measures past `MAX_ROWS`).
const KERNEL_ROWS: usize = 64;

/// A lazily built bf16 copy of one frozen weight, shared by the clones of its layer. It is keyed
/// by the weight's tensor id, so a weight replaced in place (a merge) gets a fresh decision.
#[derive(Clone, Default)]
pub struct Bf16Twin(Arc<Mutex<Option<TwinDecision>>>);

/// The weight a decision was made for, and its bf16 copy if it has one.
type TwinDecision = (TensorId, Option<Tensor>);

impl Bf16Twin {
    /// The bf16 copy of `weight` when it is a frozen f32 CPU weight whose values are all bf16
    /// values; `None` otherwise (the caller keeps the f32 GEMM).
    pub fn get(&self, weight: &Tensor) -> Result<Option<Tensor>> {
        if weight.dtype() != DType::F32
            || !matches!(weight.device(), Device::Cpu)
            || weight.is_variable()
            || weight.rank() != 2
            || !kernel_available()
        {
            return Ok(None);
        }
        let mut slot = self.0.lock().expect("twin lock");
        if let Some((id, twin)) = slot.as_ref() {
            if *id == weight.id() {
                return Ok(twin.clone());
            }
        }
        let twin = bf16_copy_if_exact(weight)?;
        *slot = Some((weight.id(), twin.clone()));
        Ok(twin)
    }
}

/// `Some(bf16 copy)` when every value of the f32 `weight` survives the round trip to bf16 exactly.
/// Reads the weight in place (the LM head alone is 0.5 GB in f32: no temporary copy of it).
pub fn bf16_copy_if_exact(weight: &Tensor) -> Result<Option<Tensor>> {
    let w = weight.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let values = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => return Ok(None),
    };
    let exact = values.par_chunks(1 << 16).all(|c| {
        c.iter()
            .all(|v| bf16::from_f32(*v).to_f32().to_bits() == v.to_bits())
    });
    if !exact {
        return Ok(None);
    }
    let halves: Vec<bf16> = values.par_iter().map(|v| bf16::from_f32(*v)).collect();
    Ok(Some(Tensor::from_vec(halves, w.dims(), w.device())?))
}

static SWITCH: crate::util::switch::EnvSwitch =
    crate::util::switch::EnvSwitch::new("MO_ALIGN_BF16_DECODE");

/// Whether decoding may use the kernel: on unless `MO_ALIGN_BF16_DECODE=0` (or `off`) was set
/// when first asked, or `set_enabled(false)` was called (the f32 GEMM for every product, e.g.
/// to A/B the two).
pub fn enabled() -> bool {
    SWITCH.get(true)
}

/// Switches the kernel on or off for the whole process.
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether the kernel is enabled and this CPU has a vector kernel for it (AVX-512F, or AVX2 with
/// FMA). Without one there is no twin and decoding keeps the f32 GEMM.
pub fn kernel_available() -> bool {
    if !enabled() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            || (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which kernel set the product runs on this CPU (printed by the bench beside gemm's).
pub fn kernel_name() -> &'static str {
    if !enabled() {
        return "off (MO_ALIGN_BF16_DECODE=0: f32 gemm)";
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
    }
    "none (f32 gemm)"
}

/// `x [n, k] @ twin^T + bias` with `twin` [out, k] bf16 from `Bf16Twin::get`, `x` f32 with a
/// few rows (decoding sends at most `MAX_ROWS`). No gradient flows (decoding only).
pub fn bf16_rows_linear(x: &Tensor, twin: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.contiguous()?.apply_op1_no_bwd(&Bf16RowsLinear {
        weight: twin.clone(),
    })?;
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?),
        None => Ok(y),
    }
}

struct Bf16RowsLinear {
    weight: Tensor,
}

impl CustomOp1 for Bf16RowsLinear {
    fn name(&self) -> &'static str {
        "bf16-rows-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let x = match (x, xl.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("bf16-rows-linear: the input must be contiguous f32"),
        };
        let (ws, wl) = self.weight.storage_and_layout();
        let (n, k2) = wl.shape().dims2()?;
        let w = match (&*ws, wl.contiguous_offsets()) {
            (candle_core::Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("bf16-rows-linear: the weight must be contiguous bf16"),
        };
        if k != k2 || m == 0 || m > KERNEL_ROWS {
            candle_core::bail!(
                "bf16-rows-linear: [{m}, {k}] @ [{n}, {k2}]^T is not a decode shape"
            );
        }
        let mut out_t = vec![0f32; n * m];
        if n * k <= SERIAL_WEIGHTS {
            // The k/v projections (128 x 896): splitting them across the pool cost more than
            // the product (0.23x gemm at one row, `micro-decode`, 2026-12-05).
            rows_times_bf16_t(x, m, k, w, &mut out_t);
            return Ok((
                CpuStorage::F32(transpose(&out_t, m, n)),
                Shape::from((m, n)),
            ));
        }
        // Blocks of weight rows, a multiple of 4 (the kernels' row block), several per thread.
        let threads = rayon::current_num_threads().max(1);
        let rows = (n / (threads * 8)).clamp(16, 1024) / 4 * 4;
        out_t
            .par_chunks_mut(rows * m)
            .enumerate()
            .for_each(|(c, o)| {
                let j0 = c * rows;
                let nb = o.len() / m;
                rows_times_bf16_t(x, m, k, &w[j0 * k..(j0 + nb) * k], o);
            });
        Ok((
            CpuStorage::F32(transpose(&out_t, m, n)),
            Shape::from((m, n)),
        ))
    }
}

/// Weights of at most this many values are multiplied on the calling thread.
const SERIAL_WEIGHTS: usize = 1 << 18;

/// `out_t` [n, m] -> [m, n]: a few rows of n floats, negligible next to reading the weight.
fn transpose(out_t: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    out
}

/// Dispatch on the CPU's vector extensions, checked at run time (the binary is built for
/// baseline x86-64).
fn rows_times_bf16_t(x: &[f32], m: usize, k: usize, w: &[bf16], out_t: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() * m == out_t.len() * k);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present; every pointer offset stays inside the slices (the
            // lengths were asserted above and the kernels read rows < n, columns < k).
            unsafe { x86::avx512(x, m, k, w, out_t) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above, for AVX2 + FMA.
            unsafe { x86::avx2(x, m, k, w, out_t) };
            return;
        }
    }
    scalar(x, m, k, w, out_t)
}

/// `out_t[j * m + i] = sum_p x[i, p] * w[j, p]` (the transposed product, so each thread's block
/// of weight rows writes one contiguous block of the output).
fn scalar(x: &[f32], m: usize, k: usize, w: &[bf16], out_t: &mut [f32]) {
    for (j, o) in out_t.chunks_mut(m).enumerate() {
        let wr = &w[j * k..(j + 1) * k];
        for (i, oi) in o.iter_mut().enumerate() {
            let xr = &x[i * k..(i + 1) * k];
            *oi = xr.iter().zip(wr).map(|(a, b)| a * b.to_f32()).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::bf16;
    use std::arch::x86_64::*;

    /// One kernel per vector width: `NR` weight rows by `MR` activation rows of accumulators,
    /// each weight vector widened from bf16 once and used for all `MR` rows. The weight block
    /// (4 rows, a few KiB) stays in L1 while the activation rows are swept in groups.
    macro_rules! kernel {
        ($name:ident, $block:ident, $feat:literal, $lanes:expr, $mr_max:expr, $vec:ty,
         $zero:expr, $widen:expr, $loadx:expr, $fma:expr, $hsum:expr) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(x: &[f32], m: usize, k: usize, w: &[bf16], out_t: &mut [f32]) {
                let n = out_t.len() / m;
                let mut j = 0;
                while j < n {
                    let nr = if n - j >= 4 { 4 } else { 1 };
                    let mut i = 0;
                    while i < m {
                        let mr = (m - i).min($mr_max);
                        macro_rules! go {
                            ($nr:literal, $mr:literal) => {
                                $block::<$nr, $mr>(x, m, k, w, out_t, i, j)
                            };
                        }
                        match (nr, mr) {
                            (4, 1) => go!(4, 1),
                            (4, 2) => go!(4, 2),
                            (4, 3) => go!(4, 3),
                            (4, 4) => go!(4, 4),
                            (_, 1) => go!(1, 1),
                            (_, 2) => go!(1, 2),
                            (_, 3) => go!(1, 3),
                            _ => go!(1, 4),
                        }
                        i += mr;
                    }
                    j += nr;
                }
            }

            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn $block<const NR: usize, const MR: usize>(
                x: &[f32],
                m: usize,
                k: usize,
                w: &[bf16],
                out_t: &mut [f32],
                i0: usize,
                j0: usize,
            ) {
                let (xp, wp) = (x.as_ptr(), w.as_ptr() as *const u16);
                let mut acc: [[$vec; MR]; NR] = [[$zero; MR]; NR];
                let mut p = 0;
                while p + $lanes <= k {
                    let mut wv: [$vec; NR] = [$zero; NR];
                    for r in 0..NR {
                        wv[r] = $widen(wp.add((j0 + r) * k + p));
                    }
                    for c in 0..MR {
                        let xv = $loadx(xp.add((i0 + c) * k + p));
                        for r in 0..NR {
                            acc[r][c] = $fma(wv[r], xv, acc[r][c]);
                        }
                    }
                    p += $lanes;
                }
                for r in 0..NR {
                    for c in 0..MR {
                        let mut s = $hsum(acc[r][c]);
                        for q in p..k {
                            s += x[(i0 + c) * k + q] * w[(j0 + r) * k + q].to_f32();
                        }
                        out_t[(j0 + r) * m + i0 + c] = s;
                    }
                }
            }
        };
    }

    // bf16 is the high half of an f32: zero-extend each 16-bit value and shift it up.
    kernel!(
        avx512,
        block512,
        "avx512f",
        16,
        4,
        __m512,
        _mm512_setzero_ps(),
        |p: *const u16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p as *const __m256i)
        ))),
        |p: *const f32| _mm512_loadu_ps(p),
        |a, b, c| _mm512_fmadd_ps(a, b, c),
        |v| _mm512_reduce_add_ps(v)
    );

    // Sixteen ymm registers: 4 x 2 accumulators, 4 widened weights and one activation vector.
    kernel!(
        avx2,
        block256,
        "avx2,fma",
        8,
        2,
        __m256,
        _mm256_setzero_ps(),
        |p: *const u16| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p as *const __m128i)
        ))),
        |p: *const f32| _mm256_loadu_ps(p),
        |a, b, c| _mm256_fmadd_ps(a, b, c),
        |v: __m256| {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_f32_product_for_every_row_count_and_an_odd_shape() -> Result<()> {
        let dev = Device::Cpu;
        // The last two are above SERIAL_WEIGHTS: split across the pool, an odd row count.
        for (m, k, n) in [
            (1, 896, 64),
            (3, 37, 10),
            (5, 64, 7),
            (8, 96, 130),
            (2, 896, 1000),
            (3, 700, 1001),
        ] {
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?;
            let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
            let b = Tensor::randn(0f32, 1., n, &dev)?;
            // Not through `Bf16Twin::get`: the model test below switches the kernel off for a
            // moment, and tests run in parallel.
            let twin = bf16_copy_if_exact(&w)?.expect("bf16 values have a twin");
            let y = bf16_rows_linear(&x, &twin, Some(&b))?;
            let y_ref = x.matmul(&w.t()?)?.broadcast_add(&b)?;
            let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-3 * (k as f32).sqrt(),
                "[{m},{k}]x[{n},{k}]: {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_weight_with_values_bf16_cannot_hold_gets_no_twin() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1.0f32, 1.0 + 1.0 / 1024.0]], &dev)?;
        assert!(bf16_copy_if_exact(&w)?.is_none());
        let exact = Tensor::new(&[[1.0f32, 1.5]], &dev)?;
        assert!(bf16_copy_if_exact(&exact)?.is_some());
        Ok(())
    }

    /// The whole decoding path (every projection with a gated LoRA, the LM head, greedy
    /// generation with the KV cache) with the kernel against the same model on the f32 GEMM.
    #[test]
    fn a_model_decodes_the_same_with_the_kernel_as_with_the_gemm() -> anyhow::Result<()> {
        use crate::generate::{generate, SamplingConfig};
        use crate::model::input::ModelInput;
        use crate::model::tiny::{random_model, tiny_config};
        use crate::model::{ForwardCtx, LoraConfig};
        if !kernel_available() {
            return Ok(()); // nothing to compare on a CPU without the kernel
        }
        let dev = Device::Cpu;
        let mut model = random_model(&tiny_config(), DType::F32, &dev)?;
        let cfg = LoraConfig {
            r: 4,
            ..LoraConfig::default()
        };
        for (i, lin) in model.linears_mut().enumerate() {
            let (out, inp) = (lin.out_features(), lin.in_features());
            let a = Tensor::randn(0f32, 0.3, (cfg.r, inp), &dev)?;
            let b = Tensor::randn(0f32, 0.3, (out, cfg.r), &dev)?;
            lin.attach(&cfg, a, b)?;
            assert!(i > 0 || lin.twin.get(&lin.weight)?.is_some(), "no twin");
        }
        let gate = Tensor::new(&[1.0f32, 0.5, 0.0, 2.0], &dev)?;
        let ctx = ForwardCtx::EVAL.with_gate(Some(&gate));
        let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 13, 2, 7], vec![11, 3, 8, 21, 4]];
        let last_logits = || -> anyhow::Result<Tensor> {
            let input = ModelInput::right_padded(&prompts, 0, &dev)?;
            let hidden = model.forward(&input, ctx, None)?;
            Ok(model.logits(&hidden.narrow(1, 4, 1)?.squeeze(1)?)?)
        };
        let sampling = SamplingConfig {
            max_new_tokens: 12,
            temperature: 0.0,
            ..SamplingConfig::default()
        };
        let decode = || generate(&model, &prompts, &[0, 1], &sampling, &[], 0, ctx);
        let (kernel_logits, kernel_ids) = (last_logits()?, decode()?);
        set_enabled(false);
        let (gemm_logits, gemm_ids) = (last_logits()?, decode()?);
        set_enabled(true);
        let diff = (&kernel_logits - &gemm_logits)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let scale = gemm_logits.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-5 * scale.max(1.0), "logits differ by {diff}");
        assert_eq!(kernel_ids, gemm_ids);
        Ok(())
    }
}
