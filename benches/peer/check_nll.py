#!/usr/bin/env python3
"""Mean NLL per predicted token of a text file with transformers (+ an optional PEFT adapter, or
a merged model directory), to compare with `mo-align eval --perplexity FILE --json`.

    $REF/venv/bin/python benches/peer/check_nll.py MODEL_DIR TEXT_FILE [ADAPTER_DIR]
Prints one JSON line: {"nll_per_token": ..., "tokens": ...}.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text_file = sys.argv[1], sys.argv[2]
adapter = sys.argv[3] if len(sys.argv) > 3 else None
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
if adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter)
model.eval()
enc = tok(open(text_file).read(), return_tensors="pt")
with torch.no_grad():
    logits = model(**enc).logits.double()
ids = enc["input_ids"][0]
lp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[1:, None])[:, 0]
print(json.dumps({"nll_per_token": -lp.mean().item(), "tokens": len(ids) - 1}))
