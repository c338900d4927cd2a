#!/usr/bin/env python3
"""Reads a GGUF file written by `mo-align merge --gguf` back with the `gguf` package (through
transformers' GGUF loader, which dequantises every tensor with it) and reports the mean NLL per
predicted token of a text, to compare with `mo-align eval --adapter ... --perplexity`.

    $REF/venv/bin/python benches/peer/check_gguf.py OUT_DIR/model-f32.gguf TEXT_FILE [--hf-config]
--hf-config takes the model config from OUT_DIR/config.json instead of the GGUF: transformers'
GGUF loader ignores `qwen3.attention.key_length` (llama.cpp reads it) and assumes Qwen3's
default head_dim of 128, which every released Qwen3 has but the tiny test model does not.
Prints one JSON line: nll_per_token, tokens, whether the GGUF's own tokenizer tokenises the text
as the checkpoint's tokenizer.json does, and the metadata keys (tokenizer, chat template).
"""
import json
import os
import sys

import torch
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

path, text_file = sys.argv[1], sys.argv[2]
hf_config = "--hf-config" in sys.argv[3:]
directory, name = os.path.dirname(path), os.path.basename(path)
reader = GGUFReader(path)
keys = sorted(reader.fields)
tensor_types = sorted({t.tensor_type.name for t in reader.tensors})
text = open(text_file).read()

extra = {"config": AutoConfig.from_pretrained(directory)} if hf_config else {}
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                             **extra).eval()
hf_tok = AutoTokenizer.from_pretrained(directory)
gguf_tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
ids = hf_tok(text, return_tensors="pt")["input_ids"]
same_ids = gguf_tok(text)["input_ids"] == ids[0].tolist()
with torch.no_grad():
    logits = model(input_ids=ids).logits.double()
lp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
template = reader.fields.get("tokenizer.chat_template")
print(json.dumps({
    "nll_per_token": -lp.mean().item(),
    "tokens": ids.shape[1] - 1,
    "gguf_tokenizer_ids_equal": same_ids,
    "tensor_types": tensor_types,
    "has_chat_template": template is not None,
    "tokenizer_keys": [k for k in keys if k.startswith("tokenizer.")],
    "architecture": bytes(reader.fields["general.architecture"].parts[-1]).decode(),
}))
