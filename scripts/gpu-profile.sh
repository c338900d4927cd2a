#!/usr/bin/env bash
# The GPU profile of a training step, in one call that fits a ~9-minute lease.
#
#   scripts/gpu-profile.sh [CAP ...]
#
# Without an NVIDIA GPU (where the Rust toolchain is): builds and packs the CUDA dists,
# `scripts/build-cuda.sh CAP ...` (default 89 90), to carry to a GPU machine.
#
# On the GPU machine (no Rust toolchain or network; python3 with PyTorch, transformers and
# PEFT for the peer), from the repository root, with target/cuda-dist(.tar.xz) present, runs
# these phases, each under its own time budget (seconds), appending results as they come:
#   env      nvidia-smi and the torch version                               (GP_ENV_S=20)
#   tests    tests/cuda.rs: every fused kernel against its CPU twin first,
#            then the model-level CUDA tests                                 (GP_TESTS_S=150)
#   bench    bf16 LoRA SFT 4 x 1024 and DPO 2 x 1024, 6 steps each, per variant:
#            fused (default), unfused (MO_ALIGN_FUSED=0), fused with cudarc's
#            event tracking on (MO_ALIGN_CUDA_EVENT_TRACKING=1), fused with
#            1,024-row LM-head chunks (train.logits_chunk; default 128); full
#            fine-tuning 1 x 1024 beside them                                (GP_BENCH_S=200)
#   scopes   the SFT step with MO_ALIGN_SCOPE_TIMERS=1: host ms and device ms
#            per scope and per kernel of a layer (the opbench table)         (GP_SCOPES_S=60)
#   torch    PyTorch + PEFT's same steps, and its SFT step under
#            torch.profiler (kernel launches and device time per op)         (GP_TORCH_S=120)
#   ncu      (only with NCU=1) Nsight Compute on one fused SFT step, first
#            200 kernels                                                     (GP_NCU_S=120)
# Default budgets sum to 550 s. PHASES="env tests bench scopes torch" picks and orders them.
# Results go to $OUT when set (the device tool's folder), else target/gpu-profile:
#   results.jsonl (one line per phase and per bench case), results.md (the table), *.log.
# A phase that fails or runs out of time is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! nvidia-smi --query-gpu=name --format=csv,noheader >/dev/null 2>&1; then
  echo "== no NVIDIA GPU here: building the CUDA dists to carry to one"
  [ $# -gt 0 ] || set -- 89 90
  exec scripts/build-cuda.sh "$@"
fi

DIST=target/cuda-dist
if [ ! -x "$DIST/run.sh" ]; then
  [ -f "$DIST.tar.xz" ] || { echo "gpu-profile: neither $DIST nor $DIST.tar.xz exists; build it with scripts/build-cuda.sh on a machine with a Rust toolchain" >&2; exit 2; }
  tar xJf "$DIST.tar.xz" -C target
fi
RESULTS=${OUT:-target/gpu-profile}
mkdir -p "$RESULTS"
JSONL=$RESULTS/results.jsonl
touch "$JSONL"
failed=0
export DIST RESULTS

phase() {
  local name=$1 budget=$2 script=$3
  echo "== $name (budget ${budget}s)"
  local t0 rc secs timed_out=false
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$budget" bash -c "set -o pipefail; $script" 2>&1 | tee -a "$RESULTS/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
  [ "$rc" = 0 ] || failed=1
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then timed_out=true; fi
  echo "{\"phase\": \"$name\", \"rc\": $rc, \"timed_out\": $timed_out, \"seconds\": $secs}" >> "$JSONL"
  echo "== $name: rc $rc in ${secs}s"
}

ENV='gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | head -1)
torch_v=$(python3 -c "import torch; print(torch.__version__)" 2>/dev/null || echo none)
nvidia-smi
python3 -c "import json, sys, datetime; print(json.dumps({\"phase\": \"env\", \"gpu\": sys.argv[1], \"torch\": sys.argv[2], \"date\": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec=\"seconds\")}))" "$gpu" "$torch_v" >> "$RESULTS/results.jsonl"'

TESTS='"$DIST/run-tests.sh" kernels:: && "$DIST/run-tests.sh" --skip kernels:: --skip demo'

# One bench case in one variant: the JSON line tagged with the variant.
BENCH='run() {
  local variant=$1 case=$2; shift 2
  env "$@" BENCH_STEPS=6 "$DIST/run-bench.sh" --case "$case" 2>>"$RESULTS/bench.err" \
    | python3 -c "import json, sys; [print(json.dumps(dict(json.loads(l), variant=sys.argv[1]))) for l in sys.stdin if l.startswith(\"{\")]" "$variant" \
    | tee -a "$RESULTS/bench-mo.jsonl"
}
for c in gpu-sft-b4-t1024 gpu-dpo-b2-t1024; do
  run fused "$c" MO_ALIGN_FUSED=1
  run unfused "$c" MO_ALIGN_FUSED=0
  run fused-event-tracking "$c" MO_ALIGN_FUSED=1 MO_ALIGN_CUDA_EVENT_TRACKING=1
  run fused-head-chunk-1024 "$c" MO_ALIGN_FUSED=1 BENCH_LOGITS_CHUNK=1024
done
run full-finetune gpu-fullsft-b1-t1024 MO_ALIGN_FUSED=1'

SCOPES='MO_ALIGN_SCOPE_TIMERS=1 BENCH_STEPS=3 "$DIST/run-bench.sh" --case gpu-sft-b4-t1024 \
  > "$RESULTS/scopes.jsonl" 2> "$RESULTS/scopes.txt"; rc=$?; cat "$RESULTS/scopes.txt"; exit $rc'

TORCH='for m in "sft 4" "dpo 2"; do set -- $m
  python3 benches/peer/torch_gpu_bench.py --mode $1 --batch $2 --seq 1024 --steps 6 | tee -a "$RESULTS/bench-torch.jsonl"
done
python3 benches/peer/torch_gpu_bench.py --mode sft --batch 4 --seq 1024 --steps 3 --profile "$RESULTS/torch-profile.txt" | tee -a "$RESULTS/bench-torch.jsonl"'

NCU_RUN='command -v ncu >/dev/null || { echo "ncu not installed"; exit 0; }
. "$DIST/env.sh" 2>/dev/null; here=$DIST
ncu --launch-count 200 --target-processes all --csv --page raw \
  --metrics gpu__time_duration.sum,dram__bytes.sum,launch__grid_size \
  "$DIST/run-bench.sh" --case gpu-sft-b4-t1024 > "$RESULTS/ncu.csv"'

for p in ${PHASES:-env tests bench scopes torch}; do
  case $p in
    env) phase env "${GP_ENV_S:-20}" "$ENV" ;;
    tests) phase tests "${GP_TESTS_S:-150}" "$TESTS" ;;
    bench) phase bench "${GP_BENCH_S:-200}" "$BENCH" ;;
    scopes) phase scopes "${GP_SCOPES_S:-60}" "$SCOPES" ;;
    torch) phase torch "${GP_TORCH_S:-120}" "$TORCH" ;;
    ncu) [ "${NCU:-0}" = 1 ] && phase ncu "${GP_NCU_S:-120}" "$NCU_RUN" ;;
    *) echo "gpu-profile: unknown phase $p" >&2; exit 2 ;;
  esac
done

# The table: every mo-align variant beside PyTorch + PEFT's same step.
python3 - "$RESULTS" <<'PY'
import json, os, sys
res = sys.argv[1]
def rows(name):
    path = os.path.join(res, name)
    out = []
    if os.path.exists(path):
        for line in open(path):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out
mo, peer = rows("bench-mo.jsonl"), rows("bench-torch.jsonl")
env = next((p for p in rows("results.jsonl") if p.get("phase") == "env"), {})
def torch_row(r):
    return next((p for p in peer if p.get("mode") == r.get("mode") and p.get("B") == r.get("B")
                 and p.get("T") == r.get("T") and "tok_per_s" in p), None)
fmt = lambda v, spec: "-" if v is None else format(v, spec)
lines = [f"# GPU profile: {env.get('gpu', '?')}, torch {env.get('torch', '?')}, {env.get('date', '')}", "",
         "| case | variant | tok/s | vs PyTorch + PEFT | MFU | kernel launches / step | GB / step (kernels) | forward s | backward s | optimizer s | peak MiB |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in mo:
    if "error" in r:
        lines.append(f"| {r.get('case')} | {r.get('variant')} | error: {r['error']} | | | | | | | | |")
        continue
    p = torch_row(r)
    ratio = r["tok_per_s"] / p["tok_per_s"] if p else None
    lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
        r["case"], r.get("variant"), fmt(r["tok_per_s"], ".0f"), fmt(ratio, ".2f") + ("x" if ratio else ""),
        fmt(r.get("mfu"), ".1%"), r.get("kernel_launches", "-"), fmt(r.get("kernel_gbytes"), ".1f"),
        fmt(r.get("forward_s_median"), ".3f"), fmt(r.get("backward_s_median"), ".3f"),
        fmt(r.get("optimizer_s_median"), ".3f"), fmt(r.get("peak_device_mib"), ".0f")))
for p in peer:
    if "tok_per_s" in p:
        lines.append(f"| torch {p.get('mode')} {p.get('B')}x{p.get('T')} | PyTorch + PEFT | {p['tok_per_s']:.0f} | 1.00x | {fmt(p.get('mfu'), '.1%')} | {p.get('cuda_kernel_launches', '-')} | | | | | {fmt(p.get('peak_device_mib'), '.0f')} |")
open(os.path.join(res, "results.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
exit $failed
