#!/usr/bin/env bash
# Builds mo-align with `--features cuda` on a machine without a GPU or a system CUDA toolkit,
# for a GPU machine that has the NVIDIA driver (libcuda) but no Rust toolchain.
#
#   scripts/build-cuda.sh [COMPUTE_CAP]        # default 90 (H100/H200); 89 for an RTX 4090
#
# What it does:
#   1. installs the CUDA 13.0 nvcc, headers and runtime libraries from PyPI wheels into
#      target/cuda-toolkit (no root; the GPU machines run driver 580 = CUDA 13.0; the 12.x
#      nvcc wheels ship ptxas only);
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
CUDA_VERSION_PIN=${CUDA_VERSION_PIN:-13.0}
ROOT=$TK/py/nvidia/cu13   # the CUDA 13 wheels share one tree: bin/, include/, lib/, nvvm/

if [ ! -x "$TK/bin/nvcc" ]; then
  echo "== installing the CUDA $CUDA_VERSION_PIN toolkit wheels into $TK"
  rm -rf "$TK" && mkdir -p "$TK"
  "$PY" -m pip install --quiet --no-deps --target "$TK/py" \
    "nvidia-cuda-nvcc==$CUDA_VERSION_PIN.*" "nvidia-cuda-crt==$CUDA_VERSION_PIN.*" "nvidia-nvvm==$CUDA_VERSION_PIN.*" \
    "nvidia-cuda-runtime==$CUDA_VERSION_PIN.*" "nvidia-cuda-nvrtc==$CUDA_VERSION_PIN.*" \
    "nvidia-cuda-cccl==$CUDA_VERSION_PIN.*" "nvidia-cublas==$CUDA_VERSION_PIN.*" "nvidia-curand==10.4.0.*"
  [ -x "$ROOT/bin/nvcc" ] || { echo "no nvcc in the $CUDA_VERSION_PIN wheels ($ROOT/bin)" >&2; exit 1; }
  for d in bin include nvvm; do ln -s "$ROOT/$d" "$TK/$d"; done
  mkdir -p "$TK/lib64"
  cp -a "$ROOT"/lib/* "$TK/lib64/"
  # The linker looks for libX.so; wheels ship libX.so.MAJOR only.
  (cd "$TK/lib64" && for f in lib*.so.*; do base=${f%%.so.*}.so; [ -e "$base" ] || ln -s "$f" "$base"; done)
fi

cargo fetch --quiet
CUDARC_SRC=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | "$PY" -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
if [ ! -e "$TK/lib64/stubs/libcuda.so" ]; then
  echo "== writing a stub libcuda.so from cudarc's driver bindings"
  mkdir -p "$TK/lib64/stubs"
  # Every driver function cudarc declares in its `extern "C"` blocks (the names it links).
  grep -rhoE '^\s+fn cu[A-Za-z0-9_]+\(' "$CUDARC_SRC/src/driver/sys" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$TK/lib64/stubs/libcuda_stub.c"
  [ -s "$TK/lib64/stubs/libcuda_stub.c" ] || { echo "no driver symbols found under $CUDARC_SRC" >&2; exit 1; }
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

rm -rf "$DIST" && mkdir -p "$DIST"
cp target/cuda/release/mo-align "$DIST/"
# cuBLAS / cuRAND / NVRTC are hundreds of MB: on the GPU machine use the copies PyTorch's wheels
# installed (site-packages/nvidia/*/lib), or carry target/cuda-toolkit/lib64 where none exist.
cat > "$DIST/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the CUDA build with the CUDA libraries of the local PyTorch installation.
here=$(cd "$(dirname "$0")" && pwd)
libs=$(python3 -c 'import nvidia, os; r=os.path.dirname(nvidia.__path__[0]) + "/nvidia"; print(":".join(os.path.join(r, d, "lib") for d in os.listdir(r) if os.path.isdir(os.path.join(r, d, "lib"))))' 2>/dev/null)
LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/mo-align" "$@"
RUN
chmod +x "$DIST/run.sh"
echo "== done: $DIST/mo-align (run it there with $DIST/run.sh ...)"
du -sh "$DIST"
