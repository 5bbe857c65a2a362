"""Batched generation tokens/s: nanoseek's engine vs HF `generate` (with its KV cache), same model and prompts."""
from __future__ import annotations

import tempfile
import time

import torch

from benchmarks.common import Row, time_alternating
from nanoseek.config import get_preset
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.transformer import Transformer


def run(preset: str = "tiny", batches: tuple[int, ...] = (16, 64), prompt_len: int = 32, new_tokens: int = 128,
        reps: int = 3, device: str = "cpu") -> list[Row]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = get_preset(preset)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d).to(device).eval()
    ours = ours.to(device).eval()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    ours, hf = ours.to(dtype), hf.to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for B in batches:
        prompts = torch.randint(2, cfg.vocab_size, (B, prompt_len), device=device)
        engines = [Engine(ours, max_batch=B, max_len=prompt_len + new_tokens, compile=c) for c in (False, True)]
        sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

        def gen(engine):
            engine.generate(prompts.tolist(), sp)
            sync()

        t = time.perf_counter()
        gen(engines[1])  # the compile (once per batch-size range) stays out of the timed repetitions
        compile_s = time.perf_counter() - t

        def gen_hf():
            with torch.no_grad():
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            sync()

        a, c, b = time_alternating([lambda: gen(engines[0]), lambda: gen(engines[1]), gen_hf], reps=reps)
        tokens = B * new_tokens
        what = f"({preset}, batch {B}, {prompt_len}+{new_tokens} tokens, {str(dtype)[6:]}, {device})"
        rows.append(Row(f"generate greedy {what}", tokens / a, tokens / b, "tokens/s", b / a,
                        "HF generate with its DynamicCache"))
        rows.append(Row(f"generate greedy, compiled decode {what}", tokens / c, tokens / b, "tokens/s", b / c,
                        f"Engine(compile=True); its first call, {compile_s:.0f} s with compiling, is not timed"))
    rows.append(cache_row(ours, hf, cfg, device, dtype))
    return rows


def cache_row(ours, hf, cfg, device: str, dtype) -> Row:
    """Decode cache bytes per token: our latent cache vs what HF's DynamicCache actually holds."""
    T = 16
    ids = torch.randint(2, cfg.vocab_size, (1, T), device=device)
    with torch.no_grad():
        cache = hf(input_ids=ids, use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    tensors = ([t for lay in layers for t in (lay.keys, lay.values)] if layers is not None
               else [t for kv in cache for t in kv])
    hf_bytes = sum(t.numel() * t.element_size() for t in tensors) / T
    ours_bytes = Engine(ours, max_batch=1, max_len=T).cache_bytes_per_token()
    formula = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * torch.empty((), dtype=dtype).element_size()
    assert ours_bytes == formula, (ours_bytes, formula)
    return Row(f"decode cache bytes/token ({cfg.num_hidden_layers} layers, {str(dtype)[6:]})", ours_bytes, hf_bytes,
               "bytes", hf_bytes / ours_bytes,
               f"= (kv_lora_rank {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}) x layers x dtype; HF: what its "
               "DynamicCache holds (transformers 5 caches the same latent)")
