#!/usr/bin/env bash
# Counts the backend ops of one training step (and one decoding step), per phase, on the CPU.
#
#   scripts/count-ops.sh [CASE ...]     # default: count-sft-b4-t1024 count-dpo-b2-t1024
#                                       #          count-generate-b16-t128
#
# Why this way: every candle tensor op reaches the backend through one of the methods of
# `candle_core::storage::Storage` (or `Device` for allocations and host uploads), and on CUDA
# each of them is one kernel launch, memset or copy. So the number of calls to those methods
# in one step is the number of launches the same step makes on a GPU. Most of them are inlined,
# so the benchmark binary is built with full debug information for candle-core (a separate
# target directory, target/opcount), and gdb puts a breakpoint on every inlined copy of each
# method. The step itself is untouched: the benchmark's `count-*` cases run Qwen2.5-0.5B's
# structure (24 layers, 14/2 heads, vocabulary 151,936, LoRA r 8 with dropout on every
# projection) at a narrow width and open a counting window around one step after the warm-up
# (`mo_align_count_window`); the trainer marks its phases through `mo_align_phase`
# (src/util/profile.rs). Breakpoint hits cost ~20 us each, so a 12,000-op step counts in seconds.
#
# Output: one table per case and window: ops per phase and per op kind. `alloc` (device
# allocations without a fill: cudaMallocAsync on CUDA) is listed apart and not counted as a
# launch.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=("$@")
[ ${#CASES[@]} -gt 0 ] || CASES=(count-sft-b4-t1024 count-dpo-b2-t1024 count-generate-b16-t128)
command -v gdb >/dev/null || { echo "count-ops: needs gdb (apt-get install gdb)" >&2; exit 2; }

BIN=$(cargo bench --bench train_step --no-run --target-dir target/opcount \
  --config 'profile.release.package."candle-core".debug = 2' --config 'profile.release.package."mo-align".debug = 2' --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "train_step" and m.get("executable"):
        print(m["executable"])')
[ -x "$BIN" ] || { echo "count-ops: the benchmark did not build (cargo bench --bench train_step --no-run --target-dir target/opcount)" >&2; exit 1; }

# Storage methods that reach a backend (each one launch / memset / copy on CUDA), Device
# functions that allocate and fill or upload, and mo-align's in-place ops (marked in src/). Most are generic or inlined, so each gets a
# breakpoint on its first statement's source line: gdb then stops at every inlined copy.
CANDLE=$(cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "candle-core").rsplit("/", 1)[0])')
mapfile -t SITES < <(CANDLE="$CANDLE" python3 - <<'PY'
import os, re
src = os.environ["CANDLE"] + "/src/"
groups = [
    ("storage.rs", "const_set affine powf elu cmp reduce_op to_dtype apply_op1 apply_op2 apply_op3 "
                   "unary_impl binary_impl where_cond gather scatter_set scatter_add "
                   "index_add index_select matmul copy_strided_src copy2d try_clone"),
    ("device.rs", "zeros storage_from_slice storage storage_owned alloc_uninit"),
]
for f, names in groups:
    lines = open(src + f).read().split("\n")
    for n in names.split():
        i = next(i for i, l in enumerate(lines) if re.search(r"\bfn %s\b" % n, l))
        j = i
        while not lines[j].rstrip().endswith("{"):
            j += 1
        end = next((e for e in range(j + 1, len(lines)) if re.search(r"\bfn [a-z_0-9]+", lines[e])), len(lines))
        if n == "inplace_op":
            # Dispatched through a macro: its forward call runs once per op.
            k = next(k for k in range(j, end) if "Some(distinct) =>" in lines[k])
        else:
            # The CPU arm's call into the backend: code in every inlined copy (a first
            # statement such as a device check often compiles into nothing).
            k = next((k for k in range(j, end) if re.search(r"(Storage|Self|Device)::Cpu\b", lines[k])), j + 1)
            if lines[k].rstrip().endswith("{"):
                k += 1
                while not lines[k].strip() or lines[k].strip().startswith("//"):
                    k += 1
        print(f"{n} {src}{f}:{k + 1} {k + 1} {end + 1}")
# In-place custom ops are generic in candle and instantiated (and inlined) in mo-align, where
# gdb finds no copy of candle's line: every in-place op mo-align defines marks its CPU
# forward's first line instead, and those are the sites.
import pathlib
for path in sorted(pathlib.Path("src").rglob("*.rs")):
    for i, l in enumerate(path.read_text().split("\n")):
        m = re.search(r"// count-ops: ([a-z_0-9]+)$", l)
        if m:
            print(f"{m.group(1)} {path.resolve()}:{i + 1} {i + 1} {i + 3}")
PY
)
# gdb puts a line breakpoint on the next line that has code when the line has none (the
# first statement is often a check compiled into nothing): keep those that land inside their
# own function, and drop those that slid into the next one (a function the benchmark never
# calls has no code at all).
GDB=$(mktemp)
trap 'rm -f "$GDB"' EXIT
for site in "${SITES[@]}"; do read -r _ loc _ _ <<<"$site"; echo "break $loc"; done > "$GDB"
PROBE=$(gdb -batch -nx -x "$GDB" "$BIN" 2>&1 | grep -E '^Breakpoint|locations\)')
KINDS=()
LOCS=()
i=0
while read -r line; do
  read -r name loc start end <<<"${SITES[$i]}"
  i=$((i + 1))
  if [[ $line =~ line\ ([0-9]+)\. ]]; then got=${BASH_REMATCH[1]}; else got=$start; fi
  if [ "$got" -ge "$start" ] && [ "$got" -lt "$end" ]; then
    KINDS+=("$name")
    LOCS+=("$loc")
  fi
done <<<"$PROBE"
NPHASE=6
PHASES=(other forward lm_head backward grad_norm optimizer)
MAXWIN=3

{
  echo "set pagination off"
  echo "set confirm off"
  echo "set breakpoint pending on"
  echo "set print thread-events off"
  echo "set \$phase = 0"
  echo "set \$win = 0"
  for ((w = 1; w <= MAXWIN; w++)); do
    for ((p = 0; p < NPHASE; p++)); do
      for ((k = 0; k < ${#KINDS[@]}; k++)); do echo "set \$c_${w}_${p}_${k} = 0"; done
    done
  done
  echo "break mo_align_phase"
  echo "commands"
  echo "silent"
  echo "set \$phase = \$rdi"
  echo "continue"
  echo "end"
  echo "break mo_align_count_window"
  echo "commands"
  echo "silent"
  echo "set \$win = \$rdi"
  echo "continue"
  echo "end"
  for ((k = 0; k < ${#KINDS[@]}; k++)); do
    echo "break ${LOCS[$k]}"
    echo "commands"
    echo "silent"
    echo "if \$win > 0"
    echo "eval \"set \$c_%d_%d_$k = \$c_%d_%d_$k + 1\", \$win, \$phase, \$win, \$phase"
    echo "end"
    echo "continue"
    echo "end"
  done
  echo "run"
  for ((w = 1; w <= MAXWIN; w++)); do
    for ((p = 0; p < NPHASE; p++)); do
      for ((k = 0; k < ${#KINDS[@]}; k++)); do
        echo "printf \"COUNT $w $p $k %d\\n\", \$c_${w}_${p}_${k}"
      done
    done
  done
} > "$GDB"

for case in "${CASES[@]}"; do
  echo "== $case"
  OUT=$(RAYON_NUM_THREADS=1 gdb -batch -nx -x "$GDB" --args "$BIN" --case "$case" ${COUNT_ARGS:-} 2>&1) || true
  echo "$OUT" | grep -q '^COUNT ' || { echo "$OUT" | tail -20; echo "count-ops: gdb produced no counts for $case" >&2; exit 1; }
  echo "$OUT" | grep '^COUNT ' | KINDS="${KINDS[*]}" PHASES="${PHASES[*]}" python3 -c '
import os, sys, collections
kinds = os.environ["KINDS"].split()
phases = os.environ["PHASES"].split()
c = collections.defaultdict(int)
for line in sys.stdin:
    _, w, p, k, n = line.split()
    c[(int(w), int(p), int(k))] += int(n)
for w in sorted({w for (w, _, _), n in c.items() if n}):
    ops = {(p, k): n for (ww, p, k), n in c.items() if ww == w and n and kinds[k] != "alloc_uninit"}
    allocs = sum(n for (ww, p, k), n in c.items() if ww == w and kinds[k] == "alloc_uninit")
    total = sum(ops.values())
    print(f"window {w}: {total} ops ({allocs} allocations without a fill, not counted)")
    for p in range(len(phases)):
        n = sum(v for (pp, _), v in ops.items() if pp == p)
        if n:
            top = sorted(((v, kinds[k]) for (pp, k), v in ops.items() if pp == p), reverse=True)
            print(f"  {phases[p]:<10} {n:>6}   " + ", ".join(f"{name} {v}" for v, name in top))
'
done
