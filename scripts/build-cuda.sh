#!/usr/bin/env bash
# Builds mo-align with `--features cuda` on a machine without a GPU or a system CUDA toolkit,
# for a GPU machine that has the NVIDIA driver (libcuda) but no Rust toolchain.
#
#   scripts/build-cuda.sh [COMPUTE_CAP]        # default 90 (H100/H200); 89 for an RTX 4090
#
# What it does:
#   1. installs CUDA 12.x nvcc, headers and runtime libraries from PyPI wheels into
#      target/cuda-toolkit (no root; driver 580 runs CUDA <= 13.0, so 12.x is safe);
#   2. lays them out as a toolkit (bin/, include/, lib64/ with the unversioned .so names the
#      linker wants) and writes a stub libcuda.so exporting the driver API symbols cudarc
#      links against (the real libcuda.so.1 comes with the driver on the GPU machine);
#   3. runs `cargo build --release --features cuda` with CUDA_COMPUTE_CAP set;
#   4. copies the binary and the CUDA libraries the GPU machine lacks into target/cuda-dist/,
#      ready to carry (run there as: LD_LIBRARY_PATH=target/cuda-dist/lib target/cuda-dist/mo-align ...).
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=${1:-90}
TK=$PWD/target/cuda-toolkit
DIST=$PWD/target/cuda-dist
PY=${PYTHON:-python3}
CUDA_VERSION_PIN=${CUDA_VERSION_PIN:-12.9}

if [ ! -x "$TK/bin/nvcc" ]; then
  echo "== installing the CUDA $CUDA_VERSION_PIN toolkit wheels into $TK"
  rm -rf "$TK" && mkdir -p "$TK"
  "$PY" -m pip install --quiet --no-deps --target "$TK/py" \
    "nvidia-cuda-nvcc-cu12==$CUDA_VERSION_PIN.*" "nvidia-cuda-runtime-cu12==$CUDA_VERSION_PIN.*" \
    "nvidia-cuda-nvrtc-cu12==$CUDA_VERSION_PIN.*" "nvidia-cuda-cccl-cu12==$CUDA_VERSION_PIN.*" \
    "nvidia-cublas-cu12" "nvidia-curand-cu12"
  mkdir -p "$TK/bin" "$TK/include" "$TK/lib64" "$TK/nvvm"
  N=$TK/py/nvidia
  cp -r "$N"/cuda_nvcc/bin/* "$TK/bin/"
  cp -r "$N"/cuda_nvcc/nvvm/* "$TK/nvvm/"
  for d in "$N"/*/include; do cp -r "$d"/* "$TK/include/"; done
  for d in "$N"/*/lib; do cp -a "$d"/* "$TK/lib64/"; done
  # The linker looks for libX.so; wheels ship libX.so.MAJOR only.
  (cd "$TK/lib64" && for f in lib*.so.*; do base=${f%%.so.*}.so; [ -e "$base" ] || ln -s "$f" "$base"; done)
fi

CUDARC_SRC=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | "$PY" -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
if [ ! -e "$TK/lib64/stubs/libcuda.so" ]; then
  echo "== writing a stub libcuda.so from cudarc's driver bindings"
  mkdir -p "$TK/lib64/stubs"
  grep -rhoE 'pub fn cu[A-Za-z0-9_]+\(' "$CUDARC_SRC/src/driver/sys" | sed -E 's/pub fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$TK/lib64/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/lib64/stubs/libcuda.so" "$TK/lib64/stubs/libcuda_stub.c"
fi

echo "== cargo build --release --features cuda (compute capability $CAP)"
export CUDA_ROOT=$TK CUDA_PATH=$TK CUDA_TOOLKIT_ROOT_DIR=$TK
export PATH=$TK/bin:$PATH
export CUDA_COMPUTE_CAP=$CAP
export LIBRARY_PATH=$TK/lib64:$TK/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export LD_LIBRARY_PATH=$TK/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L $TK/lib64 -L $TK/lib64/stubs"
cargo build --release --features cuda --bin mo-align --target-dir target/cuda

rm -rf "$DIST" && mkdir -p "$DIST/lib"
cp target/cuda/release/mo-align "$DIST/"
for lib in libcublas libcublasLt libcurand libnvrtc libnvrtc-builtins libcudart; do
  cp -a "$TK"/lib64/"$lib".so* "$DIST/lib/" 2>/dev/null || true
done
echo "== done: $DIST (run with LD_LIBRARY_PATH=$DIST/lib)"
du -sh "$DIST"
