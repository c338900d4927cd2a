//! The CPU side of the process: the thread count fixed at start-up, and which matmul kernels run.
//!
//! Candle's CPU matmul asks `candle_core::utils::get_num_threads()` on every call, and without
//! `RAYON_NUM_THREADS` that function counts physical cores by reading `/proc/cpuinfo` (the
//! `num_cpus` crate). A decoding step makes hundreds of small matmuls, so the file was parsed
//! hundreds of times a step: 4% of a B = 8 decoding run's samples (perf, 2026-12-04). Setting the
//! variable to the same count candle would compute makes each call an environment lookup.
//! Our own kernels ask `threads()`, counted once per process, so a program that uses the library
//! without `main` (the tests) does not parse the file at every matmul either: the in-process
//! demo pipeline test spent 6 of its 8 minutes in the kernel doing so (strace, 2026-12-06).

use std::sync::OnceLock;

/// The matmul thread count: candle's own default (`RAYON_NUM_THREADS`, else the physical
/// cores), counted on first use.
pub fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Sets `RAYON_NUM_THREADS` to candle's own default when the user has not set it. Call at the
/// very start of `main`, before any thread exists (the environment is process-wide).
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// The vector kernels candle's CPU matmul (gemm) runs on this CPU with this build: AVX-512 only
/// where the CPU has it *and* the binary was built with the `avx512` feature.
pub fn gemm_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        if avx512 && cfg!(feature = "avx512") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return if avx512 {
                "avx2+fma (the CPU has AVX-512: build with --features avx512 to use it)"
            } else {
                "avx2+fma"
            };
        }
    }
    "baseline"
}

/// One line for the log: threads, gemm's kernels, and decoding's bf16 kernel (`decode_kernel`,
/// which the model module knows).
pub fn kernel_report(decode_kernel: &str) -> String {
    format!(
        "cpu: {} threads; matmul (gemm): {}; decoding (bf16 weights): {}",
        threads(),
        gemm_kernels(),
        decode_kernel
    )
}
