//! mo-align's own CUDA kernels (`ops.cu`): device-side dropout and a fused AdamW step.
//!
//! `src/build.rs` compiles `ops.cu` to PTX for compute capability 8.0 when the `cuda` feature is
//! on; the driver JIT-compiles that PTX for the card at hand (sm_80, sm_86, sm_89 = RTX 4090,
//! sm_90 = H100), so one build serves every card from Ampere on. Each kernel has a CPU twin in
//! Rust next to its caller; the CPU twins are what the default test suite checks.

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
    ($dev:expr, $name:expr, $n:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let (module, ptx) = $crate::kernels::MODULE;
        let func = $dev.get_or_load_custom_func($name, module, ptx)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // SAFETY: the caller passes the arguments in the order and types ops.cu declares.
        unsafe { builder.launch($crate::kernels::launch_config($n)) }
            .w()
            .map(|_| ())
    }};
}

/// A grid-stride launch over `n` elements.
#[cfg(feature = "cuda")]
pub fn launch_config(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    const THREADS: usize = 256;
    let blocks = n.div_ceil(THREADS).clamp(1, 65_535);
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}
