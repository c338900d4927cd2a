"""Golden gradients of full fine-tuning for mo-align's tests: every base weight's gradient of a
mean next-token NLL on the tiny checkpoint, in float64, from transformers.

    python benches/peer/golden_full.py TINY_DIR tests/golden/tiny_seed0
    python benches/peer/golden_full.py TINY3_DIR tests/golden/tiny_qwen3_seed0

TINY_DIR is `mo-align init-tiny --seed 0`'s checkpoint (TINY3_DIR the same with --arch qwen3); the sequence is the first of
reference.json's `seqs`. Writes full_grads.safetensors (HF parameter names; the tied embedding
once, with the gradient of both its uses) with the loss in the metadata.
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

# As in golden_tiny.py: transformers computes RMSNorm and the rotary tables in float32 even for a
# float64 model; the f64 reference runs both in f64 (the same formulas), as mo-align does.
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3


def _norm_forward(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@torch.no_grad()
def _rope_forward(self, x, position_ids):
    dim = self.inv_freq.shape[0] * 2
    theta = getattr(self.config, "rope_theta", None) or self.config.rope_parameters["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].double() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


modeling_qwen2.Qwen2RMSNorm.forward = _norm_forward
modeling_qwen2.Qwen2RotaryEmbedding.forward = _rope_forward
modeling_qwen3.Qwen3RMSNorm.forward = _norm_forward
modeling_qwen3.Qwen3RotaryEmbedding.forward = _rope_forward

tiny, golden = sys.argv[1], sys.argv[2]
seq = json.load(open(f"{golden}/reference.json"))["seqs"][0]
model = AutoModelForCausalLM.from_pretrained(
    tiny, dtype=torch.float64
).train()
ids = torch.tensor([seq])
logits = model(input_ids=ids).logits[0, :-1].double()
logp = torch.log_softmax(logits, dim=-1)
picked = logp.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
loss = -picked.mean()
loss.backward()
grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()}
import transformers
save_file(grads, f"{golden}/full_grads.safetensors", metadata={
    "loss": repr(loss.item()),
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "tokens": str(len(seq)),
})
print(loss.item(), len(grads))
