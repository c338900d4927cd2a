#!/usr/bin/env python3
"""Reads a mo-align run directory's TensorBoard event file with TensorBoard's own event
accumulator and compares every scalar with metrics.jsonl (the same values, at the same steps,
each step once; an evaluation line contributes its eval_ values).

    $REF/venv/bin/pip install tensorboard
    $REF/venv/bin/python benches/peer/check_tensorboard.py RUN_DIR [RUN_DIR ...]
Prints one JSON line per run: scalars compared, tags, and the largest difference.
"""
import json
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def tag_of(key):
    return "eval/" + key[5:] if key.startswith("eval_") else "train/" + key


for run in sys.argv[1:]:
    want = {}
    for line in open(f"{run}/metrics.jsonl"):
        rec = json.loads(line)
        # An evaluation line's own scalars are its eval_ ones (epoch is the training line's).
        is_eval = any(k.startswith("eval_") for k in rec)
        for k, v in rec.items():
            if k != "step" and (not is_eval or k.startswith("eval_")) and isinstance(v, (int, float)) and not isinstance(v, bool):
                want.setdefault(tag_of(k), []).append((rec["step"], float(np.float32(v))))
    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert sorted(tags) == sorted(want), (sorted(tags), sorted(want))
    worst, n = 0.0, 0
    for tag in tags:
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        steps = [s for s, _ in got]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears twice: {steps}"
        assert [s for s, _ in want[tag]] == steps, (tag, want[tag], got)
        for (_, a), (_, b) in zip(want[tag], got):
            if np.isfinite(a):
                worst = max(worst, abs(a - b))
            n += 1
    print(json.dumps({"run": run, "scalars": n, "tags": len(tags), "max_abs_diff": worst}))
