#!/usr/bin/env python3
"""PyTorch + PEFT counterpart of `cargo bench --bench train_step -- --device cuda --dtype bf16`.

    python3 benches/peer/torch_gpu_bench.py --suite [--model-dir DIR] [--peak-tflops X]
    python3 benches/peer/torch_gpu_bench.py --mode dpo --batch 2 --seq 1024

Same settings as mo-align's `gpu-*` cases: Qwen2.5-0.5B dimensions (random weights unless
--model-dir), base weights in --dtype (bf16 default), LoRA r 8, alpha 16, dropout 0.05 on all
seven projections with f32 adapter weights (PEFT's autocast_adapter_dtype), torch AdamW on the
adapter, random token ids, sdpa attention, eager mode (no torch.compile). `sft` is a causal-LM
loss at every position; `dpo` runs the reference forward with the adapter disabled (no grad)
and the policy on chosen and rejected (B pairs, prompt = first T/2 tokens) every step.
Prints one JSON line per case: tokens/s (SFT B*T, DPO 2*B*T per step), peak device memory
(torch.cuda.max_memory_allocated and max_memory_reserved), and MFU against the dense bf16 peak
with the same nominal FLOPs per token as the Rust bench. `generate` is greedy decoding with
transformers' `generate` (B prompts of T tokens, 64 new tokens each; new tokens/s). Never needed to build or test mo-align.
"""
import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SUITE = [("sft", 4, 1024), ("dpo", 2, 1024), ("sft", 8, 1024), ("generate", 16, 128)]
PEAKS = [("h200", 989.4), ("h100 pcie", 756.0), ("h100", 989.4), ("a100", 312.0), ("l40s", 362.0),
         ("4090", 165.2), ("a10g", 70.0)]


def real_config():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)


def tiny_config():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def nominal_flops_per_token(c, mode, t):
    """Same formula as `nominal_flops_per_token` in benches/train_step.rs."""
    hd = c.hidden_size // c.num_attention_heads
    d, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    h, i, l = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    body = l * (h * d + 2 * h * kv + d * h + 3 * h * i)
    head = c.vocab_size * h
    attn = 2.0 * t * d * l
    fwd = 2.0 * (body + head) + attn
    return {"sft": 2 * fwd + attn, "dpo": 3 * fwd + attn}[mode]


def seq_logps(logits, ids, prompt_len):
    lp = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), -1)
    return lp.gather(-1, ids[:, prompt_len:, None]).squeeze(-1).sum(-1)


def run_one(a):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM
    dev = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    torch.manual_seed(0)
    if a.model_dir:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype, attn_implementation="sdpa")
    else:
        cfg = tiny_config() if a.tiny else real_config()
        cfg._attn_implementation = "sdpa"
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.to(dev)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    c = model.config
    vocab = min(c.vocab_size, 151643)
    b, t = a.batch, a.seq
    g = torch.Generator().manual_seed(1234)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if a.mode == "generate":
        return run_generate(a, model, dev, vocab, g, sync)
    if a.mode == "sft":
        ids = torch.randint(0, vocab, (b, t), generator=g).to(dev)
        tokens = b * t

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
    else:
        half = t // 2
        prompt = torch.randint(0, vocab, (b, half), generator=g)
        chosen = torch.cat([prompt, torch.randint(0, vocab, (b, t - half), generator=g)], 1)
        rejected = torch.cat([prompt, torch.randint(0, vocab, (b, t - half), generator=g)], 1)
        ids = torch.cat([chosen, rejected]).to(dev)
        tokens = 2 * b * t

        def step():
            with torch.no_grad(), model.disable_adapter():
                ref = seq_logps(model(input_ids=ids).logits, ids, half)
            pol = seq_logps(model(input_ids=ids).logits, ids, half)
            logits = 0.1 * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:]))
            loss = -F.logsigmoid(logits).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

    for _ in range(a.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = a.peak_tflops or (next((v for k, v in PEAKS if k in name.lower()), None) if a.dtype == "bf16" else None)
    flops = nominal_flops_per_token(c, a.mode, t)
    achieved = flops * tokens / step_s / 1e12
    out = {
        "bench": "torch_peft", "mode": a.mode, "B": b, "T": t, "dtype": a.dtype, "device": name,
        "torch": torch.__version__, "timed_steps": len(times), "step_s_median": step_s,
        "tok_per_s": tokens / step_s, "nominal_flops_per_token": flops, "achieved_tflops": achieved,
        "peak_tflops": peak, "mfu": achieved / peak if peak else None,
    }
    if dev.type == "cuda":
        out["peak_device_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["peak_device_reserved_mib"] = torch.cuda.max_memory_reserved(dev) / 2**20
    if a.profile:
        # One more step under torch.profiler: device kernels launched, and the table of ops by
        # device time (scripts/gpu-profile.sh's counterpart of mo-align's scope timers).
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["cuda_kernel_launches"] = len(kernels)
        out["cuda_kernel_ms"] = sum(e.device_time_total for e in kernels) / 1e3
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        with open(a.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=60))
    print(json.dumps(out), flush=True)


def run_generate(a, model, dev, vocab, g, sync):
    """Greedy KV-cache decoding with transformers' `generate`, the adapter on (as mo-align's
    `gpu-generate` case decodes the LoRA model unmerged): B prompts of T tokens, --new-tokens new
    tokens each, never stopping early; new tokens per second."""
    model.eval()
    b, t = a.batch, a.seq
    ids = torch.randint(0, vocab, (b, t), generator=g).to(dev)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=a.new_tokens, do_sample=False,
               pad_token_id=0, eos_token_id=None)
    if a.sample:
        # As mo-align's `real-sample-*` cases and its evaluation sample: no top-k cut.
        gen.update(do_sample=True, temperature=0.7, top_p=0.9, top_k=0)
    with torch.no_grad():
        for _ in range(a.warmup):
            model.generate(input_ids=ids, attention_mask=mask, **gen)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **gen)
            sync()
            times.append(time.perf_counter() - t0)
    assert out.shape == (b, t + a.new_tokens), out.shape
    times.sort()
    step_s = times[len(times) // 2]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    res = {"bench": "torch_peft", "mode": "sample" if a.sample else "generate", "B": b, "T": t, "new_tokens": a.new_tokens,
           "dtype": a.dtype, "device": name, "torch": torch.__version__, "timed_steps": len(times),
           "step_s_median": step_s, "tok_per_s": b * a.new_tokens / step_s}
    if dev.type == "cuda":
        res["peak_device_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        res["peak_device_reserved_mib"] = torch.cuda.max_memory_reserved(dev) / 2**20
    print(json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["sft", "dpo", "generate"], default="sft")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64, help="generate: new tokens per prompt")
    ap.add_argument("--sample", action="store_true",
                    help="generate: sample (temperature 0.7, top-p 0.9, no top-k) instead of greedy")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    ap.add_argument("--model-dir", default=None, help="HF checkpoint (default: random weights at real size)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Qwen2 (smoke test)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--suite", action="store_true", help="the standard cases, each in its own process")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="after timing, one step under torch.profiler: kernel launches in the JSON, the op table in FILE")
    a = ap.parse_args()
    if not a.suite:
        return run_one(a)
    passed = [f for f in sys.argv[1:] if f != "--suite"]
    for mode, b, t in SUITE:
        subprocess.run([sys.executable, __file__, *passed, "--mode", mode, "--batch", str(b), "--seq", str(t)],
                       check=False)


if __name__ == "__main__":
    main()
