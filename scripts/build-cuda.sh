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
#   4. builds the CUDA test binary (tests/cuda.rs: the GPU counterparts of the model and
#      training tests) and the benchmark binary (benches/train_step.rs);
#   5. writes both, stripped, with runners into target/cuda-dist/, and packs that folder as
#      target/cuda-dist.tar.xz (under the device tool's 64 MiB carry limit).
#
# On the GPU machine, from the repository root:
#   tar xJf target/cuda-dist.tar.xz -C target
#   target/cuda-dist/run.sh eval --model ... --device cuda      # the CLI
#   target/cuda-dist/run-tests.sh                               # tests/cuda.rs
#   target/cuda-dist/run-bench.sh                               # the gpu-* benchmark cases
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

# Builds one test or bench target (`cargo SUBCOMMAND --TARGET-KIND NAME [ARGS]`, release
# profile) and prints the path of its executable; compiler errors go to stderr as cargo renders them.
built_exe() {
  local sub=$1 kind=$2 name=$3
  shift 3
  echo "== cargo $sub $* --features cuda --$kind $name --no-run" >&2
  cargo "$sub" "$@" --features cuda --"$kind" "$name" --no-run --target-dir target/cuda \
    --message-format=json-render-diagnostics | NAME=$name "$PY" -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == os.environ["NAME"] and m.get("executable"):
        print(m["executable"])'
}
TEST_BIN=$(built_exe test test cuda --release)
[ -x "$TEST_BIN" ] || { echo "the CUDA test binary did not build" >&2; exit 1; }
BENCH_BIN=$(built_exe bench bench train_step)  # cargo bench is always release
[ -x "$BENCH_BIN" ] || { echo "the CUDA benchmark binary did not build" >&2; exit 1; }

rm -rf "$DIST" && mkdir -p "$DIST"
strip -o "$DIST/mo-align" target/cuda/release/mo-align
strip -o "$DIST/cuda-tests" "$TEST_BIN"
strip -o "$DIST/train-step-bench" "$BENCH_BIN"
# candle creates a cuRAND generator with every CUDA device, but mo-align never draws random
# numbers on the GPU (dropout masks and LoRA init come from seeded host streams), and PyTorch's
# CUDA 13 wheels ship no libcurand. libcurand.so.10 is 130 MB, too big to carry, so the dist has
# a stub used only where no real one is found: generator set-up succeeds, and every generate
# call fails with CURAND_STATUS_NOT_INITIALIZED (101) instead of returning garbage.
CURAND_SRC=$(dirname "$CUDARC_SRC/src/curand/sys/mod.rs")
mkdir -p "$DIST/fallback"
grep -rhoE '^\s+(pub )?fn curand[A-Za-z0-9_]+\(' "$CURAND_SRC" | sed -E 's/^\s+(pub )?fn (curand[A-Za-z0-9_]+)\(/\2/' | sort -u \
  | awk '/^curandCreateGenerator$/ {print "int " $1 "(void **gen, int kind) { static int dummy; *gen = &dummy; return 0; }"; next}
         /^curand(DestroyGenerator|SetPseudoRandomGeneratorSeed|SetStream|SetGeneratorOffset|SetGeneratorOrdering)$/ {print "int " $1 "(void) { return 0; }"; next}
         {print "int " $1 "(void) { return 101; }"}' > "$DIST/fallback/curand_stub.c"
[ -s "$DIST/fallback/curand_stub.c" ] || { echo "no cuRAND symbols found under $CURAND_SRC" >&2; exit 1; }
# The binaries ask for cuRAND's symbols at version node `libcurand.so.10`, as the real one has.
echo 'libcurand.so.10 { global: *; };' > "$DIST/fallback/curand.map"
gcc -shared -fPIC -Wl,-soname,libcurand.so.10 -Wl,--version-script="$DIST/fallback/curand.map" \
  -o "$DIST/fallback/libcurand.so.10" "$DIST/fallback/curand_stub.c"
# cuBLAS / cuRAND / NVRTC are hundreds of MB: on the GPU machine use the copies PyTorch's wheels
# installed (site-packages/nvidia/*/lib), or carry target/cuda-toolkit/lib64 where none exist.
cat > "$DIST/env.sh" <<'RUN'
# Puts the CUDA libraries of the local PyTorch installation (site-packages/nvidia/*/lib) on the
# library path; sourced by run.sh and run-tests.sh.
libs=$(python3 -c 'import nvidia, os; r=os.path.dirname(nvidia.__path__[0]) + "/nvidia"; print(":".join(os.path.join(r, d, "lib") for d in os.listdir(r) if os.path.isdir(os.path.join(r, d, "lib"))))' 2>/dev/null)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The cuRAND stub only where no real libcurand.so.10 is on the path or in the linker cache.
found=$(IFS=:; for d in $LD_LIBRARY_PATH; do [ -e "$d/libcurand.so.10" ] && echo "$d"; done)
if [ -z "$found" ] && ! ldconfig -p 2>/dev/null | grep -q 'libcurand\.so\.10'; then
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$here/fallback"
fi
RUN
cat > "$DIST/run.sh" <<'RUN'
#!/usr/bin/env bash
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
exec "$here/mo-align" "$@"
RUN
cat > "$DIST/run-tests.sh" <<'RUN'
#!/usr/bin/env bash
# Runs tests/cuda.rs from the repository root (it reads tests/golden, configs/demo and data/).
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
MO_ALIGN_BIN="$here/mo-align" exec "$here/cuda-tests" --test-threads=1 "$@"
RUN
cat > "$DIST/run-bench.sh" <<'RUN'
#!/usr/bin/env bash
# The GPU benchmark cases: run-bench.sh [--only NAME] (defaults: --device cuda --dtype bf16).
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
exec "$here/train-step-bench" --device cuda --dtype bf16 "$@"
RUN
chmod +x "$DIST/run.sh" "$DIST/run-tests.sh" "$DIST/run-bench.sh"
tar cJf "$DIST.tar.xz" -C "$(dirname "$DIST")" "$(basename "$DIST")"
echo "== done: $DIST (run it there with $DIST/run.sh ...; tests: $DIST/run-tests.sh)"
du -sh "$DIST" "$DIST.tar.xz"
