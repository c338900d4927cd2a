#!/usr/bin/env python3
"""One TRL DPO step on preference pairs, to compare with `mo-align dpo` on the same pairs.

    $REF/venv/bin/python benches/peer/trl_dpo_check.py MODEL_DIR ADAPTER_DIR PAIRS.jsonl [BETA]

The policy is MODEL + ADAPTER (trainable, dropout 0), the reference MODEL alone (passed as
`ref_model`: TRL 1.x otherwise copies the loaded adapter as the reference), batch = all pairs,
one step, in f32: TRL 1.x's configs default to `bf16=True` (bf16 autocast even on CPU), which
moves every log-prob by ~0.02 nats, so the check sets `bf16=False`. mo-align's equivalent: `--set lora.init_from=ADAPTER_DIR` with no `model.adapter`. Pairs use mo-align's tokenisation: the prompt is
the ChatML render with the generation prompt, each response its content followed by the eos
token (<|im_end|>), passed to TRL as plain strings so no chat template re-renders them.
Prints the first logged step (loss, rewards/*, logps/*) as JSON, and TRL's token ids.
"""
import json
import sys
import tempfile

import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

model_dir, adapter, pairs_file = sys.argv[1:4]
beta = float(sys.argv[4]) if len(sys.argv) > 4 else 0.1
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
rows = []
for line in open(pairs_file):
    r = json.loads(line)
    prompt_msgs = r["chosen"][:-1]
    rows.append({
        "prompt": tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True),
        "chosen": r["chosen"][-1]["content"],
        "rejected": r["rejected"][-1]["content"],
    })
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
cfg = PeftConfig.from_pretrained(adapter)
cfg.lora_dropout = 0.0
cfg.inference_mode = False
model = PeftModel.from_pretrained(base, adapter, config=cfg, is_trainable=True)
for module in model.modules():  # the adapter config's dropout survives `config=`: switch it off
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows), max_steps=1,
                 learning_rate=1e-6, beta=beta, logging_steps=1, report_to=[], use_cpu=True,
                 gradient_accumulation_steps=1, max_length=2048, lr_scheduler_type="constant",
                 save_strategy="no", bf16=False, gradient_checkpointing=False)
trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
ds = trainer.train_dataset
print(json.dumps({"trl_ids": [{"prompt": e["prompt_ids"], "chosen": e["chosen_ids"], "rejected": e["rejected_ids"]} for e in ds]}))
trainer.train()
print(json.dumps(trainer.state.log_history[0]))
