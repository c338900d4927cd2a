//! Inverted dropout with masks drawn where the tensor lives.
//!
//! Element `i` of dropout call `key` is kept when `counter_bits(key, i) >= threshold(p)`, a pure
//! function of (key, i) (SplitMix64 at position i; `src/kernels/counter_rng.h`). Nothing is
//! drawn on the host and uploaded, no mask is stored: the forward and the backward apply the
//! same function to their tensors, the CUDA kernel and this file's CPU loop give the same mask
//! bit for bit, and a resumed run replays a step's masks from (seed, step, call) alone.

use crate::util::rng::mix_seed;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use std::cell::Cell;

/// Dropout masks for one forward pass. Each call takes the next counter value, so the masks
/// depend only on (seed, order of calls) and a forward replays identically.
pub struct DropoutRng {
    seed: u64,
    calls: Cell<u64>,
}

impl DropoutRng {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            calls: Cell::new(0),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A generator whose next call id is `calls` (replays a forward from that point).
    pub fn starting_at(seed: u64, calls: u64) -> Self {
        Self {
            seed,
            calls: Cell::new(calls),
        }
    }

    /// The next call id, without taking it.
    pub fn calls(&self) -> u64 {
        self.calls.get()
    }

    /// Takes the next call id (one per dropout site in a forward).
    pub fn next_call(&self) -> u64 {
        let call = self.calls.get();
        self.calls.set(call + 1);
        call
    }

    /// The mask of dropout call `call` with drop probability `p`. The same (seed, call) always
    /// gives the same mask on every device, so a backward regenerates it instead of keeping it.
    pub fn mask(&self, call: u64, p: f32) -> DropoutMask {
        DropoutMask {
            key: mix_seed(self.seed, call, DROPOUT_STREAM),
            p,
        }
    }
}

/// Separates dropout keys from every other use of `mix_seed`.
const DROPOUT_STREAM: u64 = 0x0064_726f_706f_7574; // "dropout"

/// `counter_rng.h`'s `mo_counter_bits`: the high half of SplitMix64's output at `index`.
#[inline]
pub fn counter_bits(key: u64, index: u64) -> u32 {
    let mut z = key.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32
}

/// Bits below this are dropped: P(drop) = threshold / 2^32 = p (to 2^-32).
pub fn threshold(p: f32) -> u32 {
    (p as f64 * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
}

/// One dropout site's mask: which elements survive, and the factor survivors are scaled by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutMask {
    pub key: u64,
    pub p: f32,
}

impl DropoutMask {
    pub fn keeps(&self, index: u64) -> bool {
        counter_bits(self.key, index) >= threshold(self.p)
    }

    /// `x * mask / (1 - p)` over `x`'s elements in row-major order. Forward-only: the fused
    /// blocks call it on detached tensors and apply it again to the incoming gradient.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        x.contiguous()?.apply_op1_no_bwd(&DropoutOp {
            key: self.key,
            threshold: threshold(self.p),
            scale: 1.0 / (1.0 - self.p),
        })
    }
}

struct DropoutOp {
    key: u64,
    threshold: u32,
    scale: f32,
}

impl DropoutOp {
    /// The CPU twin of `ops.cu`'s kernels, on every core (the pool candle's matmuls use):
    /// elements are independent, so blocks of them go to different threads.
    fn run<T: Copy + Send + Sync>(
        &self,
        xs: &[T],
        zero: T,
        scale: impl Fn(T) -> T + Sync,
    ) -> Vec<T> {
        use rayon::prelude::*;
        const BLOCK: usize = 1 << 14;
        let mut out = vec![zero; xs.len()];
        out.par_chunks_mut(BLOCK)
            .zip(xs.par_chunks(BLOCK))
            .enumerate()
            .for_each(|(b, (out, xs))| {
                let first = (b * BLOCK) as u64;
                for (i, (o, &x)) in out.iter_mut().zip(xs).enumerate() {
                    if counter_bits(self.key, first + i as u64) >= self.threshold {
                        *o = scale(x);
                    }
                }
            });
        out
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "mo-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dropout: input not contiguous".into()))?;
        let k = self.scale;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end], 0.0, |x| x * k)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[start..end], 0.0, |x| x * k as f64)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.run(&v[start..end], bf16::ZERO, |x| {
                bf16::from_f32(x.to_f32() * k)
            })),
            CpuStorage::F16(v) => CpuStorage::F16(
                self.run(&v[start..end], f16::ZERO, |x| f16::from_f32(x.to_f32() * k)),
            ),
            _ => candle_core::bail!("dropout: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::CudaStorage;
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dropout: input not contiguous".into()))?;
        let n = end - start;
        let dev = s.device.clone();
        macro_rules! launch {
            ($t:ty, $kernel:literal) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let n64 = n as u64;
                crate::launch_kernel!(
                    dev,
                    $kernel,
                    n,
                    &src,
                    &out,
                    &n64,
                    &self.key,
                    &self.threshold,
                    &self.scale
                )?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s.dtype() {
            candle_core::DType::F32 => launch!(f32, "mo_dropout_f32"),
            candle_core::DType::BF16 => launch!(bf16, "mo_dropout_bf16"),
            candle_core::DType::F16 => launch!(f16, "mo_dropout_f16"),
            candle_core::DType::F64 => launch!(f64, "mo_dropout_f64"),
            d => candle_core::bail!("dropout: unsupported dtype {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn keeps_the_expected_fraction_and_scales_survivors() -> Result<()> {
        let mask = DropoutMask { key: 77, p: 0.3 };
        let x = Tensor::ones((64, 128), DType::F32, &Device::Cpu)?;
        let y = mask.apply(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
        assert!((kept - 0.7).abs() < 0.02, "kept {kept}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
        // The same key gives the same mask in every dtype (element i depends only on (key, i)).
        for dt in [DType::BF16, DType::F16, DType::F64] {
            let z = mask.apply(&x.to_dtype(dt)?)?.to_dtype(DType::F32)?;
            let z = z.flatten_all()?.to_vec1::<f32>()?;
            assert!(y.iter().zip(&z).all(|(a, b)| (*a == 0.0) == (*b == 0.0)));
        }
        // Another key, another mask.
        let other = DropoutMask { key: 78, p: 0.3 }.apply(&x)?;
        let other = other.flatten_all()?.to_vec1::<f32>()?;
        assert!(y
            .iter()
            .zip(&other)
            .any(|(a, b)| (*a == 0.0) != (*b == 0.0)));
        Ok(())
    }

    /// The CUDA kernel's hash (`src/kernels/counter_rng.h`) compiled by the host C compiler gives
    /// the same bits as the Rust twin: CPU and GPU runs draw identical masks.
    #[test]
    fn the_kernel_header_and_the_rust_twin_draw_the_same_bits() {
        let dir = std::env::temp_dir().join(format!("mo-align-rng-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("check.c");
        let header = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kernels/counter_rng.h");
        std::fs::write(
            &src,
            format!(
                "#include <stdio.h>\n#include \"{header}\"\nint main(void) {{\n  uint64_t keys[3] = {{0ull, 12345ull, 0xFFFFFFFFFFFFFFFFull}};\n  for (int k = 0; k < 3; k++) for (uint64_t i = 0; i < 1000; i += 7) printf(\"%u %d\\n\", mo_counter_bits(keys[k], i), mo_dropout_keep(keys[k], i, {t}u));\n  return 0;\n}}\n",
                t = threshold(0.1)
            ),
        )
        .unwrap();
        let exe = dir.join("check");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let status = std::process::Command::new(&cc)
            .args(["-O2", "-o"])
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("this test needs a C compiler (`{cc}`, or set CC): {e}"));
        assert!(status.success(), "{cc} failed on counter_rng.h");
        let out = std::process::Command::new(&exe).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut expected = String::new();
        let mask = DropoutMask { key: 0, p: 0.1 };
        for key in [0u64, 12345, u64::MAX] {
            for i in (0..1000u64).step_by(7) {
                let m = DropoutMask { key, ..mask };
                expected.push_str(&format!(
                    "{} {}\n",
                    counter_bits(key, i),
                    i32::from(m.keeps(i))
                ));
            }
        }
        assert_eq!(text, expected);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
