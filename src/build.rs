//! Build script: with the `cuda` feature, compiles `src/kernels/ops.cu` to PTX for compute
//! capability 8.0 (JIT-compiled by the driver for any newer card: sm_86, sm_89, sm_90). Without
//! the feature it does nothing, so the default CPU build needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/kernels/ops.cu");
    println!("cargo:rerun-if-changed=src/kernels/counter_rng.h");
    println!("cargo:rerun-if-changed=src/kernels/fused.cuh");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("mo_align_ops.ptx");
    let nvcc = find_nvcc();
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-arch=compute_80",
            "-O3",
            "-std=c++17",
            "-Isrc/kernels",
        ])
        .arg("src/kernels/ops.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("the cuda feature needs nvcc ({}): {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on src/kernels/ops.cu");
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in [
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "CUDA_TOOLKIT_ROOT_DIR",
    ] {
        if let Some(root) = std::env::var_os(var) {
            let p = PathBuf::from(root).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    let default = PathBuf::from("/usr/local/cuda/bin/nvcc");
    if default.exists() {
        return default;
    }
    PathBuf::from("nvcc")
}
