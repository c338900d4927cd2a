#!/usr/bin/env bash
# The GPU acceptance in one command.
#
#   scripts/gpu-acceptance.sh [CAP ...]
#
# On a machine without an NVIDIA GPU (where the Rust toolchain is): builds and packs the CUDA
# dist, `scripts/build-cuda.sh CAP ...` (target/cuda-dist.tar.xz; carry it to the GPU machine).
#
# On a machine with an NVIDIA GPU (no Rust toolchain or network needed; python3 with PyTorch,
# transformers and PEFT for the peer benches), from the repository root, with target/cuda-dist
# or target/cuda-dist.tar.xz present, runs back to back:
#   tests  tests/cuda.rs (CUDA against the CPU, the demo's SFT and DPO stages on CUDA, f32, bf16);
#   bench  the bf16 real-size benches (`gpu-*` cases: SFT, DPO, the online GRPO step,
#          generation) and benches/peer/torch_gpu_bench.py's suite (PyTorch + PEFT, eager) on the
#          same card;
#   demo   the demo pipeline (configs/demo/pipeline.toml) with every stage and the evaluation on
#          cuda.
# and writes into $RESULTS (default target/gpu-acceptance):
#   results.jsonl  one line per phase (rc, seconds) and per bench case (both tools' JSON);
#   results.md     the bench table (tokens/s, ratio to PyTorch, MFU, peak device memory) and
#                  the phases' outcomes;
#   tests.log, bench.log, demo.log, and demo/ (every stage's run directory and the pipeline's
#   summary, demo/pipeline/summary.md), from the configs copied into configs/.
#
# Each phase has a time budget (seconds; defaults sum to 22 minutes): GPU_TESTS_S=300,
# GPU_BENCH_S=420, GPU_DEMO_S=600. PHASES="tests bench demo" picks and orders them. A phase that
# fails or runs out of time is recorded and the next one still runs; the exit status is
# non-zero when any phase failed.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! nvidia-smi --query-gpu=name --format=csv,noheader >/dev/null 2>&1; then
  echo "== no NVIDIA GPU here: building the CUDA dist to carry to one"
  exec scripts/build-cuda.sh "$@"
fi

DIST=target/cuda-dist
if [ ! -x "$DIST/run.sh" ]; then
  [ -f "$DIST.tar.xz" ] || { echo "gpu-acceptance: neither $DIST nor $DIST.tar.xz exists; build it with scripts/build-cuda.sh on a machine with a Rust toolchain" >&2; exit 2; }
  tar xJf "$DIST.tar.xz" -C target
fi
RESULTS=${RESULTS:-target/gpu-acceptance}
if [ -e "$RESULTS" ] && [ ! -f "$RESULTS/results.jsonl" ]; then
  echo "gpu-acceptance: $RESULTS exists and is not an earlier acceptance run; set RESULTS to a new folder" >&2
  exit 2
fi
rm -rf "$RESULTS/demo" "$RESULTS/configs" "$RESULTS"/*.log "$RESULTS"/*.jsonl "$RESULTS"/results.md 2>/dev/null
mkdir -p "$RESULTS"
JSONL=$RESULTS/results.jsonl
: > "$JSONL"
failed=0

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | head -1)
torch_v=$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)
python3 - "$gpu" "$torch_v" >> "$JSONL" <<'PY'
import json, sys, datetime
print(json.dumps({"phase": "env", "gpu": sys.argv[1], "torch": sys.argv[2],
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}))
PY
echo "== $gpu (torch $torch_v)"

# phase NAME BUDGET_S SCRIPT: runs the bash SCRIPT under the budget, its output into NAME.log
# and the terminal, and records the outcome.
export DIST RESULTS
phase() {
  local name=$1 budget=$2 script=$3
  echo "== $name (budget ${budget}s)"
  local t0 rc secs timed_out=false
  t0=$(date +%s.%N)
  timeout --kill-after=15 "$budget" bash -c "set -o pipefail; $script" 2>&1 | tee -a "$RESULTS/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
  [ "$rc" = 0 ] || failed=1
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then timed_out=true; fi
  echo "{\"phase\": \"$name\", \"rc\": $rc, \"timed_out\": $timed_out, \"seconds\": $secs}" >> "$JSONL"
  echo "== $name: rc $rc in ${secs}s"
}

# mo-align's cases, then PyTorch's, each case in its own process (peak memory per case).
BENCH='"$DIST/run-bench.sh" | tee "$RESULTS/bench-mo.jsonl"; a=$?
python3 benches/peer/torch_gpu_bench.py --suite | tee "$RESULTS/bench-torch.jsonl"; b=$?
[ $a = 0 ] && [ $b = 0 ]'
# The demo's configs copied with every runs/demo/ and configs/demo/ path moved under
# $RESULTS, so that no earlier demo run (a CPU one in runs/demo, say) is reused or touched.
DEMO='rm -rf "$RESULTS/configs" && mkdir -p "$RESULTS/configs" && for f in configs/demo/*.toml; do
  sed -e "s|runs/demo/|$RESULTS/demo/|g" -e "s|configs/demo/|$RESULTS/configs/|g" "$f" > "$RESULTS/configs/$(basename "$f")"
done && "$DIST/run.sh" pipeline --config "$RESULTS/configs/pipeline.toml" --quiet \
  --set eval.device=cuda --set "pipeline.overrides=[\"train.device=cuda\"]"'

for p in ${PHASES:-tests bench demo}; do
  case $p in
    tests) phase tests "${GPU_TESTS_S:-300}" '"$DIST/run-tests.sh"' ;;
    bench) phase bench "${GPU_BENCH_S:-420}" "$BENCH" ;;
    demo) phase demo "${GPU_DEMO_S:-600}" "$DEMO" ;;
    *) echo "gpu-acceptance: unknown phase $p (tests, bench, demo)" >&2; exit 2 ;;
  esac
done

# The table: each mo-align case beside the PyTorch + PEFT case doing the same work.
python3 - "$RESULTS" <<'PY'
import json, os, sys
res = sys.argv[1]
def rows(name):
    path = os.path.join(res, name)
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
mo, torch_rows = rows("bench-mo.jsonl"), rows("bench-torch.jsonl")
phases = rows("results.jsonl")
with open(os.path.join(res, "results.jsonl"), "a") as f:
    for r in mo + torch_rows:
        f.write(json.dumps(r) + "\n")
# sftprompt does the same work in PyTorch as sft (PEFT computes every position's logits).
peer_mode = {"sft": "sft", "sftprompt": "sft", "dpo": "dpo", "generate": "generate"}
def peer(r):
    return next((p for p in torch_rows if p.get("mode") == peer_mode.get(r.get("mode"))
                 and p.get("B") == r.get("B") and p.get("T") == r.get("T") and "tok_per_s" in p), None)
fmt = lambda v, spec: "-" if v is None else format(v, spec)
env = next((p for p in phases if p.get("phase") == "env"), {})
lines = [f"# GPU acceptance: {env.get('gpu', '?')}, torch {env.get('torch', '?')}, {env.get('date', '')}", "",
         "| phase | rc | seconds |", "|---|---|---|"]
lines += [f"| {p['phase']} | {p['rc']}{' (timed out)' if p.get('timed_out') else ''} | {p['seconds']} |"
          for p in phases if "rc" in p]
lines += ["", "| case | mo-align tok/s | PyTorch + PEFT tok/s | ratio | MFU mo-align | MFU PyTorch | peak MiB mo-align | peak MiB PyTorch (allocated / reserved) |",
          "|---|---|---|---|---|---|---|---|"]
for r in mo:
    if "error" in r:
        lines.append(f"| {r['case']} | error: {r['error']} | | | | | | |")
        continue
    p = peer(r)
    name = r["case"] + (" (mo-align recomputes layers; PyTorch does not)" if r.get("recompute_layers") and p else "")
    ratio = r["tok_per_s"] / p["tok_per_s"] if p else None
    lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
        name, fmt(r["tok_per_s"], ".0f"), fmt(p and p["tok_per_s"], ".0f"), fmt(ratio, ".2f") + ("x" if ratio else ""),
        fmt(r.get("mfu"), ".1%"), fmt(p and p.get("mfu"), ".1%"), fmt(r.get("peak_device_mib"), ".0f"),
        "-" if not p else f"{p.get('peak_device_mib', 0):.0f} / {p.get('peak_device_reserved_mib', 0):.0f}"))
for p in torch_rows:
    if "tok_per_s" not in p:
        lines.append(f"| torch {p} | | | | | | | |")
open(os.path.join(res, "results.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
exit $failed
