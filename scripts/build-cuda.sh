#!/usr/bin/env bash
# Builds mo-align with `--features cuda` on a machine without a GPU or a system CUDA toolkit,
# for a GPU machine that has the NVIDIA driver (libcuda, driver >= 580 for CUDA 13) but no Rust
# toolchain.
#
#   scripts/build-cuda.sh [CAP ...]     # e.g. 89 (RTX 4090), 90 (H100/H200)
#
# Which compute capabilities: the arguments; else the GPU's own when `nvidia-smi` sees one;
# else both 89 and 90. candle's kernels are compiled for one capability per build (PTX for
# sm_90 cannot load on an sm_89 card), so each capability gets its own build, in
# target/cuda-sm<CAP>. mo-align's own kernels (src/kernels/ops.cu) are PTX for compute_80 and
# load on either.
#
# What it does:
#   1. installs the CUDA 13.0 nvcc, headers and runtime libraries from PyPI wheels into
#      target/cuda-toolkit (no root; the 12.x nvcc wheels ship ptxas only);
#   2. lays them out as a toolkit (bin/, include/, lib64/ with the unversioned .so names the
#      linker wants) and writes a stub libcuda.so exporting the driver API symbols cudarc
#      links against (the real libcuda.so.1 comes with the driver on the GPU machine);
#   3. per capability, runs `cargo build --release --features cuda` with CUDA_COMPUTE_CAP set,
#      and builds the CUDA test binary (tests/cuda.rs) and the benchmark binary
#      (benches/train_step.rs);
#   4. writes them, stripped, into target/cuda-dist/sm<CAP>/, with runners in target/cuda-dist/
#      that pick the build matching the GPU (`nvidia-smi --query-gpu=compute_cap`), and packs
#      the folder as target/cuda-dist.tar.xz (under the device tool's 64 MiB carry limit).
#
# On the GPU machine, from the repository root:
#   tar xJf target/cuda-dist.tar.xz -C target
#   target/cuda-dist/run.sh eval --model ... --device cuda      # the CLI
#   target/cuda-dist/run-tests.sh                               # tests/cuda.rs
#   target/cuda-dist/run-bench.sh                               # the gpu-* benchmark cases
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then
  CAPS="$*"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=compute_cap --format=csv,noheader >/dev/null 2>&1; then
  CAPS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
  echo "== building for the visible GPU: compute capability $CAPS"
else
  CAPS="89 90"
  echo "== no GPU visible: building for compute capabilities $CAPS (RTX 4090, H100/H200)"
fi
mkdir -p target
# Physical paths: RUSTFLAGS carries them, and an identical string lets builds share target/.
TK=$(cd target && pwd -P)/cuda-toolkit
DIST=$(cd target && pwd -P)/cuda-dist
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

export CUDA_ROOT=$TK CUDA_PATH=$TK CUDA_TOOLKIT_ROOT_DIR=$TK
export PATH=$TK/bin:$PATH
export LIBRARY_PATH=$TK/lib64:$TK/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export LD_LIBRARY_PATH=$TK/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L $TK/lib64 -L $TK/lib64/stubs"

# Builds one test or bench target (`cargo SUBCOMMAND --TARGET-KIND NAME [ARGS]`, release
# profile) into $TARGET_DIR and prints the path of its executable; compiler errors go to stderr
# as cargo renders them.
built_exe() {
  local sub=$1 kind=$2 name=$3
  shift 3
  echo "== cargo $sub $* --features cuda --$kind $name --no-run ($TARGET_DIR)" >&2
  cargo "$sub" "$@" --features cuda --"$kind" "$name" --no-run --target-dir "$TARGET_DIR" \
    --message-format=json-render-diagnostics | NAME=$name "$PY" -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == os.environ["NAME"] and m.get("executable"):
        print(m["executable"])'
}

rm -rf "$DIST" && mkdir -p "$DIST"
for CAP in $CAPS; do
  echo "== cargo build --release --features cuda (compute capability $CAP)"
  export CUDA_COMPUTE_CAP=$CAP
  TARGET_DIR=target/cuda-sm$CAP
  cargo build --release --features cuda --bin mo-align --target-dir "$TARGET_DIR"
  TEST_BIN=$(built_exe test test cuda --release)
  [ -x "$TEST_BIN" ] || { echo "the CUDA test binary did not build (sm_$CAP)" >&2; exit 1; }
  BENCH_BIN=$(built_exe bench bench train_step)  # cargo bench is always release
  [ -x "$BENCH_BIN" ] || { echo "the CUDA benchmark binary did not build (sm_$CAP)" >&2; exit 1; }
  mkdir -p "$DIST/sm$CAP"
  strip -o "$DIST/sm$CAP/mo-align" "$TARGET_DIR/release/mo-align"
  strip -o "$DIST/sm$CAP/cuda-tests" "$TEST_BIN"
  strip -o "$DIST/sm$CAP/train-step-bench" "$BENCH_BIN"
done

# candle creates a cuRAND generator with every CUDA device, but mo-align never draws random
# numbers through it (dropout masks come from its own counter-based kernel, LoRA init and the
# benches' random weights from seeded host streams), and PyTorch's
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
# Picks the build for this GPU's compute capability ($bin_dir) and puts the CUDA libraries of
# the local PyTorch installation (site-packages/nvidia/*/lib) on the library path; sourced by
# run.sh, run-tests.sh and run-bench.sh.
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
if [ -n "${MO_ALIGN_CUDA_CAP:-}" ]; then cap=$MO_ALIGN_CUDA_CAP; fi
if [ -z "$cap" ]; then
  echo "mo-align cuda dist: nvidia-smi reports no GPU (set MO_ALIGN_CUDA_CAP to choose a build)" >&2
  exit 1
fi
if [ ! -d "$here/sm$cap" ]; then
  echo "mo-align cuda dist: no build for compute capability $cap here (have: $(cd "$here" && ls -d sm* | tr '\n' ' ')); rebuild with scripts/build-cuda.sh $cap" >&2
  exit 1
fi
bin_dir=$here/sm$cap
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
exec "$bin_dir/mo-align" "$@"
RUN
cat > "$DIST/run-tests.sh" <<'RUN'
#!/usr/bin/env bash
# Runs tests/cuda.rs from the repository root (it reads tests/golden, configs/demo and data/).
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
MO_ALIGN_BIN="$bin_dir/mo-align" exec "$bin_dir/cuda-tests" --test-threads=1 "$@"
RUN
cat > "$DIST/run-bench.sh" <<'RUN'
#!/usr/bin/env bash
# The GPU benchmark cases: run-bench.sh [--only NAME] (defaults: --device cuda --dtype bf16).
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
exec "$bin_dir/train-step-bench" --device cuda --dtype bf16 "$@"
RUN
chmod +x "$DIST/run.sh" "$DIST/run-tests.sh" "$DIST/run-bench.sh"
tar cJf "$DIST.tar.xz" -C "$(dirname "$DIST")" "$(basename "$DIST")"
echo "== done: $DIST (run it there with $DIST/run.sh ...; tests: $DIST/run-tests.sh)"
du -sh "$DIST" "$DIST.tar.xz"
