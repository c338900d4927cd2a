//! mo-align's own kernels: each is one backend op (one launch on CUDA), with a CPU twin in Rust
//! that computes the same values and is what the default test suite checks.
//!
//! - `gemm`: matrix products over strided views, into a new buffer or accumulated into an
//!   existing one (cuBLAS on CUDA, the `gemm` crate on the CPU).
//! - `norm`: RMSNorm, and the residual epilogue (residual add + LoRA up-projection + the next
//!   RMSNorm) with its backward.
//! - `lora`: the adapter's down-projection with dropout folded in, its backward products and
//!   the reductions that give the A and B gradients.
//! - `qkv`: the attention-input epilogue (bias, LoRA up, Qwen3's q/k norms, rotary embedding,
//!   head layout) and its backward.
//! - `attention`: masked softmax attention over the mask's spans (no mask tensor), forward and
//!   backward, keeping the row log-sum-exp instead of the probabilities.
//! - `swiglu`: the MLP epilogue (LoRA up, silu(gate) * up) and its backward.
//! - `xent`: the LM head's row kernel (log-sum-exp, target log-prob, softmax minus one-hot).
//! - `dropout`: the masks (drawn per call from a counter-based hash) and the op applying them.
//! - `spec`: the plain operand descriptions (matrix views, adapters, epilogue and attention
//!   geometry) that both the CPU twins and the CUDA launches (`cuda`) read.
//! - `adamw` (in `train::optim`): per-parameter updates.
//!
//! `src/build.rs` compiles `ops.cu` to PTX for compute capability 8.0 when the `cuda` feature is
//! on; the driver JIT-compiles that PTX for the card at hand (sm_80, sm_86, sm_89 = RTX 4090,
//! sm_90 = H100), so one build serves every card from Ampere on.
//!
//! Every kernel adds its launches and bytes to `crate::util::profile`'s tally, which is how a step's
//! bytes are accounted.

pub mod attention;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dropout;
pub mod gemm;
pub mod lora;
pub mod norm;
pub mod qkv;
pub mod spec;
pub mod swiglu;
pub mod xent;

use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp1, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/mo_align_ops.ptx"));

#[cfg(feature = "cuda")]
pub const MODULE: (&str, &str) = ("mo_align_ops", PTX);

/// Launches kernel `$name` of `ops.cu` over `$n` elements on `$dev` with the arguments given
/// (references, in the kernel's parameter order). The module is loaded once per device by
/// candle's custom-module cache. A macro because candle does not export its function type.
#[cfg(feature = "cuda")]
#[macro_export]
macro_rules! launch_kernel {
    ($dev:expr, $name:expr, $n:expr, $($arg:expr),+ $(,)?) => {
        $crate::launch_kernel_cfg!($dev, $name, $crate::kernels::launch_config($n), $($arg),+)
    };
}

/// `launch_kernel!` with an explicit launch configuration (grid, block, shared memory).
#[cfg(feature = "cuda")]
#[macro_export]
macro_rules! launch_kernel_cfg {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let (module, ptx) = $crate::kernels::MODULE;
        let func = $dev.get_or_load_custom_func($name, module, ptx)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        let cfg = $cfg;
        // SAFETY: the caller passes the arguments in the order and types ops.cu declares.
        unsafe { builder.launch(cfg) }
            .w()
            .map(|_| ())
    }};
}

/// A grid-stride launch over `n` elements.
#[cfg(feature = "cuda")]
pub fn launch_config(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    const THREADS: usize = 256;
    let blocks = n.div_ceil(THREADS).clamp(1, 65_535);
    grid(blocks as u32, THREADS as u32, 0)
}

/// `blocks` blocks of `threads` threads with `shared` bytes of dynamic shared memory.
#[cfg(feature = "cuda")]
pub fn grid(
    blocks: u32,
    threads: u32,
    shared: u32,
) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// An uninitialised device buffer of `n` elements of `dtype`.
#[cfg(feature = "cuda")]
pub(crate) fn alloc(
    dev: &candle_core::CudaDevice,
    dtype: DType,
    n: usize,
) -> Result<candle_core::CudaStorage> {
    use candle_core::CudaStorage;
    // SAFETY: every kernel that produces a buffer writes all of its elements.
    unsafe {
        Ok(match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::f16>(n)?, dev.clone()),
            DType::F64 => CudaStorage::wrap_cuda_slice(dev.alloc::<f64>(n)?, dev.clone()),
            other => candle_core::bail!("mo-align CUDA kernels: cannot allocate {other:?}"),
        })
    }
}

/// One op of ours that makes a new tensor: everything it reads is captured in the struct
/// (held tensors are read through their storage), so one candle op (one launch) runs it
/// whatever the number of inputs.
pub(crate) trait Produce: Send + Sync {
    fn name(&self) -> &'static str;
    /// The output's shape and dtype.
    fn output(&self) -> (Shape, DType);
    /// Bytes read and written (the tally).
    fn bytes(&self) -> u64;
    /// Device launches the op makes (an allocation alone makes none).
    fn launches(&self) -> u64 {
        1
    }
    fn cpu(&self) -> Result<CpuStorage>;
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage>;
}

/// One op of ours that writes into (part of) an existing tensor: the destination view is the
/// tensor the op is applied to; everything it reads is captured.
pub(crate) trait Update: Send + Sync {
    fn name(&self) -> &'static str;
    fn bytes(&self) -> u64;
    fn cpu(&self, dst: &mut CpuStorage, layout: &Layout) -> Result<()>;
    #[cfg(feature = "cuda")]
    fn cuda(&self, dst: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()>;
}

struct ProduceOp<'a, K: Produce>(&'a K);

impl<K: Produce> CustomOp1 for ProduceOp<'_, K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.0.cpu()?, self.0.output().0))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((self.0.cuda(&s.device)?, self.0.output().0))
    }
}

struct UpdateOp<'a, K: Update>(&'a K);

impl<K: Update> InplaceOp1 for UpdateOp<'_, K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        self.0.cpu(s, l) // count-ops: inplace_op
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        self.0.cuda(s, l)
    }
}

/// Runs `k` on `on`'s device (`on` is any tensor there; its values are not read unless `k`
/// holds it) and returns the new tensor, outside any graph.
pub(crate) fn produce<K: Produce>(k: &K, on: &Tensor) -> Result<Tensor> {
    crate::util::profile::tally_op(k.name(), k.launches(), k.bytes());
    let _timed = crate::util::profile::op_scope(k.name(), on.device());
    on.apply_op1_no_bwd(&ProduceOp(k))
}

/// Runs `k` writing into `dst` (a view: only its elements change).
pub(crate) fn update<K: Update>(k: &K, dst: &Tensor) -> Result<()> {
    crate::util::profile::tally_op(k.name(), 1, k.bytes());
    let _timed = crate::util::profile::op_scope(k.name(), dst.device());
    dst.inplace_op1(&UpdateOp(k))
}

/// A buffer whose every element an op of ours writes before anything reads it: on CUDA an
/// allocation without the memset `Tensor::zeros` launches (zeros on the CPU).
struct Uninit {
    shape: Shape,
    dtype: DType,
}

impl Produce for Uninit {
    fn name(&self) -> &'static str {
        "mo-alloc"
    }
    fn output(&self) -> (Shape, DType) {
        (self.shape.clone(), self.dtype)
    }
    fn bytes(&self) -> u64 {
        0
    }
    fn launches(&self) -> u64 {
        0
    }
    fn cpu(&self) -> Result<CpuStorage> {
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; self.shape.elem_count()]),
            DType::F64 => CpuStorage::F64(vec![0.0; self.shape.elem_count()]),
            DType::U32 => CpuStorage::U32(vec![0; self.shape.elem_count()]),
            other => candle_core::bail!("mo-align: no uninit buffer of {other:?}"),
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage> {
        alloc(dev, self.dtype, self.shape.elem_count())
    }
}

/// A `shape` buffer of `dtype` on `on`'s device for an op that writes all of it.
pub(crate) fn uninit(shape: impl Into<Shape>, dtype: DType, on: &Tensor) -> Result<Tensor> {
    produce(
        &Uninit {
            shape: shape.into(),
            dtype,
        },
        on,
    )
}

/// Bytes of `n` activation or weight elements of `dtype`. With `MO_ALIGN_TALLY_BF16=1` a
/// CPU run (f32) counts them at bf16's 2 bytes: the bytes the same kernels move in the bf16 GPU
/// step, whose activations and weights are bf16 (adapters, their gradients and the LM head's
/// logits stay f32 there: `param_bytes`, and the literal 4s).
pub(crate) fn nbytes(n: usize, dtype: DType) -> u64 {
    static AS_BF16: crate::util::switch::EnvSwitch =
        crate::util::switch::EnvSwitch::new("MO_ALIGN_TALLY_BF16");
    let size = if AS_BF16.get(false) && dtype.is_float() {
        2
    } else {
        dtype.size_in_bytes()
    };
    (n * size) as u64
}

/// Bytes of `n` f32 adapter parameters or gradients.
pub(crate) fn param_bytes(n: usize) -> u64 {
    (n * 4) as u64
}
