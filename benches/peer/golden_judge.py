"""Golden scores of an external reward model (Qwen2ForSequenceClassification or
Qwen3ForSequenceClassification) for mo-align's judge test: transformers'
apply_chat_template(conversation, tokenize=True) and the score head.

    python benches/peer/golden_judge.py TINY_DIR tests/golden/judge_tiny.json
    python benches/peer/golden_judge.py TINY3_DIR tests/golden/judge_tiny_qwen3.json

TINY_DIR is `mo-align init-tiny --seed 0`'s checkpoint (TINY3_DIR the same with --arch qwen3). The score head is seeded; its weights,
the token ids transformers scores and the scores go into the JSON the Rust test reads.
"""
import json
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tiny, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
hidden = json.load(open(f"{tiny}/config.json"))["hidden_size"]
score = (torch.randn(1, hidden) * 0.5).float()

work = tempfile.mkdtemp()
for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
    shutil.copy(f"{tiny}/{f}", f"{work}/{f}")
cfg = json.load(open(f"{work}/config.json"))
cfg["architectures"] = [cfg["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
cfg["num_labels"] = 1
json.dump(cfg, open(f"{work}/config.json", "w"))
weights = load_file(f"{tiny}/model.safetensors")
weights["score.weight"] = score
save_file(weights, f"{work}/model.safetensors", metadata={"format": "pt"})

tok = AutoTokenizer.from_pretrained(work)
model = AutoModelForSequenceClassification.from_pretrained(work, torch_dtype=torch.float32).eval()
conversations = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What color is coal?"},
     {"role": "assistant", "content": "Coal is black."}],
    [{"role": "user", "content": "Name a prime number."},
     {"role": "assistant", "content": "Seven is prime; so are 2, 3 and 5."}],
]
ids, scores = [], []
for conv in conversations:
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True)
    x = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        scores.append(float(model(input_ids=x).logits[0, 0]))
    ids.append(enc["input_ids"])
import transformers
json.dump({
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "score_weight": score[0].tolist(),
    "conversations": conversations,
    "ids": ids,
    "scores": scores,
}, open(out, "w"), indent=1)
print(scores)
