"""Batched generation with continuous batching over a preallocated cache.

Active sequences sit compacted in cache rows 0..B-1, so each decode step is one forward of
[B, 1] tokens over a contiguous slice of the cache (the MLA cache holds only c_kv + k_pe).
New requests are prefilled together into the rows after them; a request with n > 1 (a GRPO
group) prefills its prompt once and copies those cache rows to its other n-1 sequences.
A finished sequence leaves at once: the last active row moves into its hole.
With speculative=True every decode step is an MTP draft + one [B, 2] verify (speculative.py).
With a prefix cache (prefix_cache_bytes > 0, the server's choice) a prompt's cached head is copied into
its row and only the rest is prefilled; prompts and finished sequences are kept for later requests.

`add_request` / `abort` may be called from any thread; one thread drives `step()`.
"""
from __future__ import annotations

import itertools
import random
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from nanoseek.infer.prefix_cache import PrefixCache
from nanoseek.infer.sampling import (SamplingParams, apply_repetition_penalty, sample, sampling_logprobs,
                                     sampling_tensors, truncates)
from nanoseek.infer.speculative import draft_logits, mtp_forward, speculative_step
from nanoseek.kernels import speedup, transposed_weights


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)  # includes the stop token when one ended it
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    cached_tokens: int = 0  # prompt tokens whose cache values came from the prefix cache (not computed)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class Event:
    """One new token of one sequence, as `step()` reports it (for streaming)."""
    request_id: int
    index: int
    token_id: int
    text: str            # text added by this token (may be "" while a multi-byte char is incomplete)
    logprob: float
    finished: bool
    finish_reason: str | None


@dataclass
class _Seq:
    req: RequestOutput
    out: CompletionOutput
    params: SamplingParams
    gen: torch.Generator | None
    pos: int = 0              # position of the next token to write
    last: int = 0             # last token (input of the next decode step)
    text: str = ""            # completion text so far (incremental detokenization)
    dec_from: int = 0         # token index the decode window starts at
    dec_upto: int = 0         # tokens [dec_from, dec_upto) are already in `text`
    sent: int = 0             # characters of `text` already reported in events (the rest may start a stop string)
    u: list[float] = field(default_factory=list)  # pre-drawn uniforms from `gen` (one per sampled token)
    q: torch.Tensor | None = None  # speculative: MTP draft logits [V] for the token after `last`
    guide: object = None           # guide.OutputGuide: which tokens may come next (None: any)

    def uniform(self) -> float:
        if self.gen is None:
            return 0.0
        if not self.u:  # draw ahead in blocks: one generator call per 64 tokens, not per token
            self.u = torch.rand(64, generator=self.gen, device=self.gen.device).tolist()[::-1]
        return self.u.pop()


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer=None, max_batch: int = 64, max_len: int | None = None,
                 dtype: torch.dtype | None = None, speculative: bool = False, compile: bool = False,
                 prefix_cache_bytes: int = 0, prefix_block: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.max_len = max_len or model.config.max_position_embeddings
        # speculative: MTP self-speculative decoding for every active sequence (models with MTP only);
        # the cache then also holds the MTP block's latent (layer num_hidden_layers)
        self.speculative = bool(speculative and len(getattr(model, "mtp", ())))
        self.cache = model.make_cache(max_batch, self.max_len, dtype=dtype, mtp=self.speculative)
        # reuse of KV across requests (server); off for batch generation (rollouts, evaluation)
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_block) if prefix_cache_bytes > 0 else None
        # the decode kernels (nanoseek.kernels); on CPU their weight copies are a snapshot:
        # build a new engine after changing the weights
        self._copies_current = speedup(model, for_="decode")
        self._layers = model.config.num_hidden_layers
        # compile: plain decode steps run through torch.compile (inductor), traced with a symbolic
        # batch and key length, so a shrinking batch or a later engine on the same model reuses the
        # code (up to 4 variants by batch size: the MoE path differs). Each variant compiles once per
        # process (~30 s on a 2-core CPU); where compiling fails the step runs eagerly (dynamo's
        # suppress_errors, with a warning). Prefill and speculative steps stay eager.
        self._compiled = None
        if compile:
            import torch._dynamo
            torch._dynamo.config.suppress_errors = True
            self._compiled = torch.compile(model.forward, dynamic=True)
        self.active: list[_Seq] = []                   # row i of the cache <-> active[i]
        self.waiting: deque[tuple[RequestOutput, SamplingParams]] = deque()
        self.requests: dict[int, RequestOutput] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._aborted: set[int] = set()
        # a sequence ends at any of the tokenizer's stop ids (eos, and generation_config's list where it has one)
        stops = getattr(tokenizer, "stop_ids", None)
        if stops is None:
            eos = getattr(tokenizer, "eos_id", model.config.eos_token_id)
            stops = [] if eos is None else [eos]
        self.stop_ids = frozenset(stops)
        self.spec_stats = {"drafted": 0, "accepted": 0}

    # ------------------------------------------------------------------ public API
    def cache_bytes_per_token(self) -> int:
        """Cache bytes per token of the main model: (kv_lora_rank + qk_rope_head_dim) x layers x dtype for MLA."""
        return self.cache.bytes_per_token() * self._layers // len(self.cache.layers)

    def add_request(self, prompt: list[int], params: SamplingParams | None = None, request_id: int | None = None) -> int:
        params = params or SamplingParams()
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} tokens")
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n} exceeds the engine's max_batch={self.max_batch}")
        if params.guide is not None and self.speculative:
            raise ValueError("a guided request (thinking budget, response_format) needs an engine without speculation")
        rid = next(self._ids) if request_id is None else request_id
        req = RequestOutput(rid, list(prompt), [CompletionOutput(i) for i in range(params.n)])
        with self._lock:
            self.requests[rid] = req
            self.waiting.append((req, params))
        return rid

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    @torch.inference_mode()
    @transposed_weights()
    def step(self) -> list[Event]:
        """Admit waiting requests (prefill), then one decode step for every active sequence."""
        events: list[Event] = []
        self._drop_aborted(events)
        self._admit(events)
        if self.active and self.speculative:
            speculative_step(self, events)
        elif self.active:
            B = len(self.active)
            ids = torch.tensor([[s.last] for s in self.active], device=self.device)
            pos = torch.tensor([[s.pos] for s in self.active], device=self.device)
            self.cache.rows = None  # rows 0..B-1
            # compiled code only while the decode copies it was traced with still match the weights
            forward = self._compiled if self._compiled is not None and self._copies_current() else self.model
            logits = forward(ids, positions=pos, cache=self.cache, kv_len=max(s.pos for s in self.active) + 1)[:, -1]
            for s in self.active:
                s.pos += 1
            self._emit(logits, list(self.active), events)
        return events

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False, speculative: bool | None = None) -> list[RequestOutput]:
        """Run prompts to completion; one RequestOutput (with n outputs) per prompt, in order.

        speculative: switch this engine's MTP self-speculative decoding on / off (None: keep).
        """
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if speculative is not None and speculative != self.speculative and len(getattr(self.model, "mtp", ())) and not self.has_work():
            self.speculative = speculative
            self.cache = self.model.make_cache(self.max_batch, self.max_len, dtype=self.cache.dtype, mtp=speculative)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=sum(sp.n for sp in plist), desc="generating", unit="seq")
        while self.has_work():
            done = sum(e.finished for e in self.step())
            if bar is not None:
                bar.update(done)
        if bar is not None:
            bar.close()
        return [self.requests.pop(r) for r in rids]

    @property
    def acceptance_rate(self) -> float:
        """Share of MTP drafts the main model accepted (speculative decoding)."""
        return self.spec_stats["accepted"] / max(1, self.spec_stats["drafted"])

    def _generator(self, params: SamplingParams, j: int) -> torch.Generator | None:
        if params.temperature == 0:
            return None
        gen = torch.Generator(device=self.device)
        base = params.seed if params.seed is not None else random.SystemRandom().randrange(2**62)
        gen.manual_seed(base + 7919 * j)  # distinct streams for the n samples of one request
        return gen

    # ------------------------------------------------------------------ internals
    def _drop_aborted(self, events: list[Event]) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            if aborted:
                self.waiting = deque((r, p) for r, p in self.waiting if r.request_id not in aborted)
        for s in [s for s in self.active if s.req.request_id in aborted]:
            self._finish(s, "abort", events)
        for rid in aborted:
            req = self.requests.get(rid)
            for o in req.outputs if req else ():
                o.finish_reason = o.finish_reason or "abort"

    def _admit(self, events: list[Event]) -> None:
        """Prefill as many waiting requests as fit, batched, with n-way prefix sharing."""
        batch: list[tuple[RequestOutput, SamplingParams]] = []
        free = self.max_batch - len(self.active)
        with self._lock:
            while self.waiting and self.waiting[0][1].n <= free:
                req, params = self.waiting.popleft()
                free -= params.n
                batch.append((req, params))
        if not batch:
            return
        start = len(self.active)
        lens = [len(r.prompt_token_ids) for r, _ in batch]
        hits = [self._load_prefix(r.prompt_token_ids, start + i) for i, (r, _) in enumerate(batch)]
        for (r, _), hit in zip(batch, hits):
            r.cached_tokens = hit
        todo = [n - hit for n, hit in zip(lens, hits)]                          # tokens each row computes
        T = max(todo)
        # Right-padded prefill into rows start..start+len(batch)-1, row i from position hits[i] on. Pad keys
        # sit at positions no real query can see yet, and each is overwritten by the sequence's own token
        # before it becomes visible (a pad past the context is written at its last position, as harmless).
        ids = torch.full((len(batch), T), min(self.stop_ids, default=0), dtype=torch.long, device=self.device)
        for i, (r, _) in enumerate(batch):
            ids[i, :todo[i]] = torch.tensor(r.prompt_token_ids[hits[i]:], device=self.device)
        pos = (torch.tensor(hits, device=self.device).unsqueeze(1) + torch.arange(T, device=self.device))
        pos = pos.clamp_max(self.max_len - 1)
        self.cache.rows = slice(start, start + len(batch))
        h, _ = self.model.hidden_states(ids, pos, self.cache)                  # [R, T, D]
        h_last = h[torch.arange(len(batch)), torch.tensor(todo) - 1]             # [R, D]
        last = self.model.lm_head(h_last)                                          # [R, V]: no head on the prompt
        if self.speculative:  # MTP latent of the prompt pairs (h_i, t_{i+1}); the last pair waits for the sample
            mtp_forward(self, h[:, :-1], ids[:, 1:], pos[:, :-1], slice(start, start + len(batch)))
        if self._use_prefix_cache():
            for i, (r, _) in enumerate(batch):
                self.prefix_cache.store(r.prompt_token_ids, self.cache, start + i)
        # Lay the groups out: prompt row i -> rows of its n sequences (copying the prompt's cache rows).
        # Prompt rows are moved from the back so no prompt row is overwritten before it is copied.
        rows_logits, seqs = [], []
        offsets = list(itertools.accumulate([p.n for _, p in batch], initial=start))
        for i in reversed(range(len(batch))):
            req, params = batch[i]
            dst = torch.arange(offsets[i], offsets[i] + params.n, device=self.device)
            self.cache.copy_rows(torch.full_like(dst, start + i), dst, lens[i])
        for i, (req, params) in enumerate(batch):
            for j in range(params.n):
                s = _Seq(req, req.outputs[j], params, self._generator(params, j), pos=lens[i],
                         guide=params.guide() if params.guide is not None else None)
                seqs.append(s)
                rows_logits.append(i)
        self.active.extend(seqs)
        rows = torch.tensor(rows_logits, device=self.device)
        logits = last[rows]
        toks = self._choose(logits, seqs)
        if self.speculative:  # the first draft: MTP on (h_{L-1}, sampled token) at position L-1
            lp = torch.tensor([s.pos - 1 for s in seqs], device=self.device).unsqueeze(1)
            h1 = mtp_forward(self, h_last[rows].unsqueeze(1), toks.unsqueeze(1), lp, slice(start, start + len(seqs)))
            for s, q in zip(seqs, draft_logits(self, h1[:, -1])):
                s.q = q
        self._finish_all(self._record(logits, toks, seqs, events))

    def _emit(self, logits: torch.Tensor, seqs: list[_Seq], events: list[Event]) -> None:
        """Sample one token for each of `seqs` from its logits row, record it, retire finished ones."""
        self._finish_all(self._record(logits, self._choose(logits, seqs), seqs, events))

    def _choose(self, logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
        """logits [B, V] -> the next token of each sequence [B], by its own sampling parameters."""
        return self._draw(self._adjust(logits, seqs), seqs)

    def _adjust(self, logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
        """The logits [B, V] (fp32) that each sequence samples from: its guide's mask and repetition penalty
        applied (a copy where either changes them)."""
        logits = logits.float()
        if any(s.guide is not None for s in seqs):
            logits = self._apply_guides(logits, seqs)
        P = [s.params for s in seqs]
        if any(p.repetition_penalty != 1 for p in P):
            rep = torch.tensor([p.repetition_penalty for p in P], device=logits.device)
            logits = apply_repetition_penalty(logits.clone(), [s.req.prompt_token_ids + s.out.token_ids for s in seqs], rep)
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
        """Adjusted logits [B, V] -> a token per sequence [B]: argmax (temperature 0) or a sample with its
        temperature, top-k / top-p / min-p and next uniform."""
        P = [s.params for s in seqs]
        if all(p.temperature == 0 for p in P):
            return logits.argmax(-1)
        u = torch.tensor([s.uniform() for s in seqs], device=logits.device)
        return sample(logits, *sampling_tensors(P, logits.device), u, truncates(P),
                      any_greedy=any(p.temperature == 0 for p in P))

    def _apply_guides(self, logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
        """Tokens a sequence's guide rules out get -inf (a copy: log-probs stay the model's own)."""
        logits = logits.clone()
        for i, s in enumerate(seqs):
            allowed = s.guide.allowed() if s.guide is not None else None
            if allowed is not None:
                logits[i].masked_fill_(~allowed.to(logits.device), float("-inf"))
        return logits

    def _record(self, logits: torch.Tensor, tok: torch.Tensor, seqs: list[_Seq], events: list[Event]) -> list:
        """Append tokens [B] (with their log-probs under `logits` [B, V]) to `seqs`; emit events.
        Returns the (seq, reason) pairs that finished; the caller retires them once the step is done."""
        raw = logits.float()
        # log-probs of the model's own distribution (what the API's logprobs report)
        lse = raw.logsumexp(-1)                                                  # [B]
        tok_lp = raw.gather(1, tok.unsqueeze(1)).squeeze(1) - lse
        processed = [s.params.logprobs_mode == "processed" for s in seqs]
        if any(processed):  # of the distribution sampled from (what an RL trainer compares with), only when asked
            P = [s.params for s in seqs]
            q_lp = sampling_logprobs(raw, tok, *sampling_tensors(P, raw.device), truncates(P))
            tok_lp = torch.where(torch.tensor(processed, device=raw.device), q_lp, tok_lp)
        kmax = max(s.params.top_logprobs for s in seqs)
        top = raw.topk(kmax, -1) if kmax else None
        # the one host sync per step: token ids for stop checks; a NaN/inf in the logits shows up in lse
        ok = torch.isfinite(lse).all().to(torch.float64).view(1)
        host = torch.cat([tok.to(torch.float64), tok_lp.to(torch.float64), ok]).tolist()  # one transfer
        B = len(seqs)
        toks, tok_lp = [int(t) for t in host[:B]], host[B:2 * B]
        if not host[-1]:
            raise FloatingPointError("non-finite logits during generation: the model weights are broken "
                                     "(NaN/inf) or the dtype overflowed; try --dtype fp32")
        finished = []
        for i, (s, t) in enumerate(zip(seqs, toks)):
            s.out.token_ids.append(t)
            s.out.logprobs.append(tok_lp[i])
            if s.guide is not None:
                s.guide.accept(t)
            if s.params.top_logprobs:
                k = s.params.top_logprobs
                s.out.top_logprobs.append(dict(zip(top.indices[i, :k].tolist(), (top.values[i, :k] - lse[i]).tolist())))
            s.last = t
            stopped = self._detok(s, t)
            reason = self._stop_reason(s, t, stopped)
            if reason is not None and not stopped and self.tokenizer is not None:
                self._flush_text(s)
            delta = self._release(s, final=reason is not None)
            events.append(Event(s.req.request_id, s.out.index, t, delta, tok_lp[i], reason is not None, reason))
            if reason is not None:
                finished.append((s, reason))
        return finished

    def _finish_all(self, finished: list) -> None:
        for s, reason in finished:
            self._finish(s, reason, None)

    def _stop_reason(self, s: _Seq, t: int, stopped: bool) -> str | None:
        p = s.params
        if stopped or t in p.stop_token_ids or (t in self.stop_ids and not p.ignore_eos):
            return "stop"
        if len(s.out.token_ids) >= p.max_tokens or s.pos + 1 >= self.max_len:  # prompt + completion <= max_len
            return "length"
        return None

    def _flush_text(self, s: _Seq) -> None:
        """At the end: whatever the windowed decode held back (e.g. a trailing partial character)."""
        ids = s.out.token_ids
        if ids and (ids[-1] in s.params.stop_token_ids or (ids[-1] in self.stop_ids and not s.params.ignore_eos)):
            ids = ids[:-1]
        full = self.tokenizer.decode(ids)
        rest = full[len(s.text):] if full.startswith(s.text) else ""
        s.text = s.out.text = s.text + rest

    @staticmethod
    def _release(s: _Seq, final: bool) -> str:
        """The text an event reports: what `text` gained since the last event, less (until the end) a tail that
        may be the start of a stop string, so a stream never shows text that a stop string later cuts."""
        end = len(s.text)
        if not final:
            end -= max((k for x in s.params.stop for k in range(1, len(x)) if s.text.endswith(x[:k])), default=0)
        out = s.text[s.sent:max(end, s.sent)]
        s.sent += len(out)
        return out

    def _detok(self, s: _Seq, t: int) -> bool:
        """Append the text of token t to `text` (incremental: decodes a short window, not the whole completion);
        whether a stop string appeared. Stop tokens and stop strings are not part of the text."""
        if self.tokenizer is None or t in s.params.stop_token_ids or (t in self.stop_ids and not s.params.ignore_eos):
            return False
        ids = s.out.token_ids
        old = self.tokenizer.decode(ids[s.dec_from:s.dec_upto])
        new = self.tokenizer.decode(ids[s.dec_from:])
        if new.endswith("\ufffd") or len(new) <= len(old):
            return False  # an incomplete multi-byte character: wait for the rest
        delta = new[len(old):]
        s.dec_from, s.dec_upto = s.dec_upto, len(ids)
        if s.params.stop:
            # a stop string may straddle tokens: search the new text plus the longest stop's worth before it
            w = max(map(len, s.params.stop))
            tail_start = max(0, len(s.text) - w)
            hay = s.text[tail_start:] + delta
            cut = min((hay.find(x) for x in s.params.stop if x in hay), default=-1)
            if cut >= 0:
                keep = tail_start + cut - len(s.text)  # chars of delta before the stop string (may be < 0)
                s.text = s.text[:tail_start + cut] if keep < 0 else s.text + delta[:keep]
                s.out.text = s.text
                return True
        s.text += delta
        s.out.text = s.text
        return False

    def _use_prefix_cache(self) -> bool:
        return self.prefix_cache is not None and not self.speculative  # see prefix_cache.py: MTP needs the next token

    def _load_prefix(self, prompt: list[int], row: int) -> int:
        """Copy the cached head of a prompt into a cache row; its length. The last prompt token is always
        computed: its logits are the first token's distribution."""
        if not self._use_prefix_cache():
            return 0
        return self.prefix_cache.load(self.prefix_cache.match(prompt, len(prompt) - 1), self.cache, row)

    def _finish(self, s: _Seq, reason: str, events: list[Event] | None) -> None:
        """Retire a sequence: its row is refilled by the last active row (keeps rows 0..B-1 dense)."""
        s.out.finish_reason = reason
        if events is not None:
            events.append(Event(s.req.request_id, s.out.index, -1, "", 0.0, True, reason))
        i = self.active.index(s)
        if self._use_prefix_cache():  # positions 0..pos-1 hold the prompt and all but the last token
            self.prefix_cache.store((s.req.prompt_token_ids + s.out.token_ids)[:s.pos], self.cache, i)
        last = len(self.active) - 1
        if i != last:
            moved = self.active[last]
            self.cache.copy_rows(torch.tensor([last]), torch.tensor([i]), moved.pos)
            self.active[i] = moved
        self.active.pop()
