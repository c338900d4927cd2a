#!/usr/bin/env python3
"""Reference values from PyTorch / transformers / PEFT for mo-align's golden tests.

Usage (reference stack from ../shared/tools/reference-env.sh):
    mo-align init-tiny --out /tmp/tiny --seed 0
    $REF/venv/bin/python benches/peer/golden_tiny.py /tmp/tiny tests/golden/tiny_seed0
    mo-align init-tiny --out /tmp/tiny3 --seed 0 --arch qwen3
    $REF/venv/bin/python benches/peer/golden_tiny.py /tmp/tiny3 tests/golden/tiny_qwen3_seed0

Prompts are rendered with enable_thinking=False (Qwen3's template reads it; Qwen2.5's ignores it).

Writes into the output directory:
  reference.json           chat-template renders and ids, plain-text ids, f64 and f32 hidden
                           states / log-probs with and without a LoRA adapter, an SFT loss,
                           a DPO pair's log-probs and sigmoid loss, and the checkpoint's sha256
  adapter/                 a PEFT-written LoRA adapter (PEFT's own files, deterministic weights)
  grads.safetensors        d(SFT loss)/d(LoRA A, B) in f64, keys as PEFT writes adapter tensors
Never needed to build or test mo-align: the outputs are committed.
"""
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, out_dir = sys.argv[1], sys.argv[2]
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
ref = {}
ref["model_sha256"] = hashlib.sha256(open(os.path.join(model_dir, "model.safetensors"), "rb").read()).hexdigest()
ref["versions"] = {m.__name__: m.__version__ for m in [torch, __import__("transformers"), __import__("peft")]}

# ---- chat template and plain tokenisation ------------------------------------------------
convs = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Give me three tips for better sleep."},
     {"role": "assistant", "content": "Dark room, same bedtime, no screens."},
     {"role": "user", "content": "Thank you! Explain why the sky is blue."},
     {"role": "assistant", "content": "Sunlight is scattered by air; blue light is scattered more."}],
    # Qwen3's template splits <think> reasoning off an answer, keeps it for the answer after the
    # last user query and drops it from earlier turns.
    [{"role": "user", "content": "Is 7 prime?"},
     {"role": "assistant", "content": "<think>\nIt has no divisors.\n</think>\n\nYes."},
     {"role": "user", "content": "And 9?"},
     {"role": "assistant", "content": "<think>\n3 times 3.\n</think>\n\nNo, 9 = 3 x 3."}],
]
ref["chat"] = []
for c in convs:
    ref["chat"].append({
        "messages": c,
        "text": tok.apply_chat_template(c, tokenize=False),
        "ids": list(tok.apply_chat_template(c, tokenize=True, return_dict=False)),
        "prompt_text": tok.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=False),
    })
texts = ["Hello world! The quick brown fox jumps over the lazy dog.",
         "  ünïcödé   spaces\n\nnew lines 12345 def f(x):\n    return x[::-1]"]
ref["plain"] = [{"text": t, "ids": tok(t)["input_ids"]} for t in texts]

# ---- model outputs -----------------------------------------------------------------------
seqs = [tok(texts[0])["input_ids"][:14], tok("Water boils at 100 degrees.")["input_ids"]]
ref["seqs"] = seqs


def logprobs(model, ids):
    out = model(input_ids=torch.tensor([ids]))
    lp = F.log_softmax(out.logits.double(), -1)[0]
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def hidden(model, ids):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


# transformers' Qwen2RMSNorm computes in float32 even for a float64 model, which would make the
# f64 reference only f32-accurate. For the f64 pass the norm runs in the input dtype (the same
# formula); the f32 pass is transformers unmodified. mo-align computes an f64 model in f64.
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3


def _patch_f64(module, norm_cls, rope_cls):
    orig_norm = norm_cls.forward

    def _norm_forward(self, hidden_states):
        if hidden_states.dtype != torch.float64:
            return orig_norm(self, hidden_states)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    orig_rope = rope_cls.forward

    # Likewise the rotary tables: f64 arithmetic for the f64 pass, transformers' f32 tables
    # otherwise.
    @torch.no_grad()
    def _rope_forward(self, x, position_ids):
        if x.dtype != torch.float64:
            return orig_rope(self, x, position_ids)
        dim = self.inv_freq.shape[0] * 2
        theta = getattr(self.config, "rope_theta", None) or self.config.rope_parameters["rope_theta"]
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    norm_cls.forward = _norm_forward
    rope_cls.forward = _rope_forward


_patch_f64(modeling_qwen2, modeling_qwen2.Qwen2RMSNorm, modeling_qwen2.Qwen2RotaryEmbedding)
_patch_f64(modeling_qwen3, modeling_qwen3.Qwen3RMSNorm, modeling_qwen3.Qwen3RotaryEmbedding)

targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
for dtype_name, dtype in [("f64", torch.float64), ("f32", torch.float32)]:
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    m.eval()
    with torch.no_grad():
        ref[f"base_{dtype_name}"] = {
            "hidden_first_seq": hidden(m, seqs[0]).double().tolist(),
            "logprobs": [logprobs(m, s) for s in seqs],
        }
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    pm = get_peft_model(m, lcfg)
    names = sorted(n for n, _ in pm.named_parameters() if "lora_" in n)
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for k, n in enumerate(names):
            p = params[n]
            vals = 0.05 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.37 + k)
            p.copy_(vals.reshape(p.shape).to(dtype))
    with torch.no_grad():
        lora_lp = [logprobs(pm, s) for s in seqs]
        with pm.disable_adapter():
            disabled_lp = [logprobs(pm, s) for s in seqs]
    # SFT loss on the second half of the first sequence: mean NLL over the labelled tokens (what
    # transformers' loss computes, but in f64 here: its own loss upcasts only to f32).
    ids = torch.tensor([seqs[0]])
    start = len(seqs[0]) // 2
    pm.train()
    lp = F.log_softmax(pm(input_ids=ids).logits.double(), -1)[0]
    picked = lp[torch.arange(start - 1, len(seqs[0]) - 1), ids[0, start:]]
    loss = -picked.mean()
    loss.backward()
    pm.eval()
    entry = {"lora_logprobs": lora_lp, "disabled_logprobs": disabled_lp, "sft_loss": loss.item(),
             "sft_label_from": len(seqs[0]) // 2}
    if dtype_name == "f64":
        grads = {}
        for n in names:
            key = n.replace(".default.weight", ".weight")
            grads[key] = params[n].grad.detach().clone().contiguous()
        save_file(grads, os.path.join(out_dir, "grads.safetensors"))
        pm.save_pretrained(os.path.join(out_dir, "adapter"))
        # DPO pair: shared prompt, two responses; summed response log-probs, beta 0.1.
        prompt = tok.apply_chat_template([{"role": "user", "content": "Name a planet."}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False,
                                         enable_thinking=False)
        chosen = tok("Mars is a planet.")["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        rejected = tok("A banana.")["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]

        def seq_logp(model, resp):
            full = list(prompt) + resp
            lp = logprobs(model, full)
            return sum(lp[len(prompt) - 1:])

        with torch.no_grad():
            pc, pr = seq_logp(pm, chosen), seq_logp(pm, rejected)
            with pm.disable_adapter():
                rc, rr = seq_logp(pm, chosen), seq_logp(pm, rejected)
        beta = 0.1
        h = beta * ((pc - rc) - (pr - rr))
        ref["dpo"] = {"prompt": list(prompt), "chosen": chosen, "rejected": rejected, "beta": beta,
                      "policy_chosen": pc, "policy_rejected": pr, "ref_chosen": rc, "ref_rejected": rr,
                      "loss_sigmoid": -F.logsigmoid(torch.tensor(h, dtype=torch.float64)).item()}
    ref[f"lora_{dtype_name}"] = entry

with open(os.path.join(out_dir, "reference.json"), "w") as f:
    json.dump(ref, f, indent=1)
print("wrote", out_dir)
