"""Serving with and without the prefix cache, in vLLM's conventions; and the cost of a JSON-constrained answer.

Two workloads over a real server (tiny random model, fixed-length answers via ignore_eos), each run with the
prefix cache off (--prefix-cache-mb 0) and on, with the same Poisson arrivals (fixed seed):
  - shared system prompt: every request carries the same long system prompt and its own question;
  - multi-turn: each conversation's second turn sends the first turn's history back.
Per run: TTFT, TPOT, ITL and end-to-end latency (mean, p50, p99, in ms), request and output-token
throughput, and the prefix-cache hit rate from `usage`. Then the JSON-constraint overhead: decode time per
token of a json_schema answer vs the same length unconstrained, and the grammar libraries side by side
(llguidance, and xgrammar where it is installed) on this machine.
Run alone: python -m benchmarks.serve_cache [--json PATH]   (python -m benchmarks --only serve_cache)
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import Row, print_table, time_alternating

SYSTEM = ("You are a careful assistant for a small shop that sells bicycles, repairs them and rents them out by "
          "the hour. Answer briefly, quote prices in euros, never promise a repair date. ") * 8
QUESTIONS = [f"question {i}: how much is a rental for {i + 1} hours on a {d}?" for i, d in
             enumerate(["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "holiday"] * 2)]
TOKENS = 16
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["price", "hours", "note"],
          "properties": {"price": {"type": "integer", "minimum": 0, "maximum": 999},
                         "hours": {"type": "integer", "minimum": 1, "maximum": 24},
                         "note": {"type": "string", "maxLength": 40}}}


def _model():
    from nanoseek.config import get_preset
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer
    tok = train_tokenizer([SYSTEM] + QUESTIONS * 4 + ['{"price": 12, "hours": 3, "note": "ok"}'] * 8, vocab_size=800)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                   eos_token_id=tok.eos_id, max_position_embeddings=2048)).eval()
    return model, tok


def _stream(client, messages, max_tokens=TOKENS, **kw) -> dict:
    """One streamed chat request: arrival-relative timings of each chunk, the answer and its usage."""
    t0, stamps, text, usage = time.perf_counter(), [], "", None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, stream=True,
                                                temperature=0, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True, **kw}):
        for c in chunk.choices:
            piece = c.delta.content or (c.delta.model_extra or {}).get("reasoning_content") or ""
            if piece:
                stamps.append(time.perf_counter() - t0)
                text += piece
        usage = chunk.usage or usage
    return {"stamps": stamps, "text": text, "usage": usage.model_dump() if usage else {}}


def _poisson(n: int, rate: float, seed: int) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _workload(client, kind: str, rate: float, seed: int) -> list[dict]:
    """Requests at Poisson arrival times; multi-turn conversations send turn 2 when turn 1 is answered."""
    results, lock = [], threading.Lock()

    def conversation(i: int) -> None:
        msgs = [{"role": "system", "content": SYSTEM}] if kind == "shared_system" else []
        msgs.append({"role": "user", "content": QUESTIONS[i] if kind == "shared_system" else SYSTEM + QUESTIONS[i]})
        r = _stream(client, msgs)
        with lock:
            results.append({**r, "turn": 1})
        if kind == "multi_turn":
            msgs += [{"role": "assistant", "content": r["text"]}, {"role": "user", "content": "and for two bikes?"}]
            r = _stream(client, msgs)
            with lock:
                results.append({**r, "turn": 2})

    start, threads = time.perf_counter(), []
    for i, at in enumerate(_poisson(len(QUESTIONS) // (2 if kind == "multi_turn" else 1), rate, seed)):
        time.sleep(max(0.0, at - (time.perf_counter() - start)))
        threads.append(threading.Thread(target=conversation, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return [{**r, "wall": wall} for r in results]


def _stats(xs: list[float]) -> dict:
    xs = sorted(x * 1e3 for x in xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"mean": statistics.fmean(xs), "p50": statistics.median(xs), "p99": pick(0.99)}


def _summary(results: list[dict], turn: int | None = None) -> dict:
    rs = [r for r in results if turn is None or r["turn"] == turn]
    ttft = [r["stamps"][0] for r in rs]
    e2e = [r["stamps"][-1] for r in rs]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / max(1, len(r["stamps"]) - 1) for r in rs]
    itl = [b - a for r in rs for a, b in zip(r["stamps"], r["stamps"][1:])]
    prompt = sum(r["usage"]["prompt_tokens"] for r in rs)
    hit = sum(r["usage"]["prompt_cache_hit_tokens"] for r in rs)
    wall = results[0]["wall"]
    return {"requests": len(rs), "ttft_ms": _stats(ttft), "tpot_ms": _stats(tpot), "itl_ms": _stats(itl),
            "e2e_ms": _stats(e2e), "request_throughput": len(rs) / wall,
            "output_throughput": sum(r["usage"]["completion_tokens"] for r in rs) / wall,
            "prompt_tokens": prompt, "cache_hit_tokens": hit, "cache_hit_rate": hit / max(1, prompt)}


def _serve_runs(model, tok, rate: float, seed: int) -> dict:
    import openai

    from nanoseek.infer.server import BackgroundServer, Options
    out = {}
    for kind in ("shared_system", "multi_turn"):
        for cache_mb in (0.0, 256.0):
            opts = Options(served_model_name="tiny", max_batch=16, max_len=2048, shutdown_timeout=5,
                           prefix_cache_mb=cache_mb)
            with BackgroundServer(opts, model=model, tokenizer=tok) as server:
                client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
                _stream(client, [{"role": "user", "content": "warm up"}])
                results = _workload(client, kind, rate, seed)
            name = f"{kind}/{'prefix_cache' if cache_mb else 'no_cache'}"
            out[name] = {"all": _summary(results)}
            if kind == "multi_turn":
                out[name]["turn2"] = _summary(results, turn=2)
    return out


def _json_overhead(model, tok, reps: int = 10) -> dict:
    """Engine decode seconds per token of one json_schema answer vs one free answer of the same length."""
    from nanoseek.infer.api_schema import ResponseFormat
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.guide import OutputGuide
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.infer.structured_output import JSONGrammars
    eng = Engine(model, tok, max_batch=1, max_len=512)
    grammars = JSONGrammars(tok, model.config.vocab_size, eng.stop_ids)
    fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}})
    answer = functools.partial(grammars.matcher, grammars.grammar(fmt))
    guide = functools.partial(OutputGuide, model.config.vocab_size, eng.stop_ids, tok, False, None, answer)
    prompt = tok.encode(QUESTIONS[0])
    constrained = eng.generate([prompt], SamplingParams(temperature=1.0, seed=0, max_tokens=200, guide=guide))
    n = len(constrained[0].outputs[0].token_ids)
    free = SamplingParams(temperature=1.0, seed=0, max_tokens=n, ignore_eos=True)
    constrained_sp = SamplingParams(temperature=1.0, seed=0, max_tokens=200, guide=guide)
    # alternated, so drift in machine speed hits both alike
    t_json, t_free = time_alternating([lambda: eng.generate([prompt], constrained_sp),
                                       lambda: eng.generate([prompt], free)], reps=reps, warmup=1)
    per_token = {"json_schema": t_json / n * 1e3, "free": t_free / n * 1e3}
    return {"answer_tokens": n, "ms_per_token": per_token,
            "overhead_ms_per_token": per_token["json_schema"] - per_token["free"]}


def _grammar_libraries(tok) -> dict:
    """Schema compile time and mask + accept time per token of each library, along one fixed valid answer."""
    answer = tok.encode(json.dumps({"price": 125, "hours": 3, "note": "two bikes, helmets included"},
                                   separators=(",", ":")))
    V, out = tok.vocab_size, {}
    import llguidance
    lltok = llguidance.LLTokenizer(tok.tk.to_str(), n_vocab=V, eos_token=sorted(tok.stop_ids))
    opts = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    t = time.perf_counter()
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=opts))
    compile_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    for tid in answer:
        m.compute_bitmask()
        m.consume_token(tid)
    out["llguidance"] = {"compile_ms": compile_ms, "mask_ms_per_token": (time.perf_counter() - t) * 1e3 / len(answer)}
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        out["xgrammar"] = "not installed"
        return out
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok.tk), vocab_size=V,
                                              stop_token_ids=sorted(tok.stop_ids))
    compiler = xgr.GrammarCompiler(info)
    t = time.perf_counter()
    xm = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    compile_ms = (time.perf_counter() - t) * 1e3
    bitmask = xgr.allocate_token_bitmask(1, V)
    t = time.perf_counter()
    for tid in answer:
        xm.fill_next_token_bitmask(bitmask)
        xm.accept_token(tid)
    out["xgrammar"] = {"compile_ms": compile_ms, "mask_ms_per_token": (time.perf_counter() - t) * 1e3 / len(answer)}
    return out


def run(reps: int = 3, rate: float = 4.0, seed: int = 0, json_path: str = "benchmarks/serve_cache.json") -> list[Row]:
    model, tok = _model()
    serve = _serve_runs(model, tok, rate, seed)
    report = {"rate_req_per_s": rate, "seed": seed, "answer_tokens": TOKENS, "serve": serve,
              "json_constraint": _json_overhead(model, tok, reps=max(reps, 10)),
              "grammar_libraries": _grammar_libraries(tok)}
    Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    rows = []
    for kind, part in (("shared_system", "all"), ("multi_turn", "turn2")):
        on, off = serve[f"{kind}/prefix_cache"][part], serve[f"{kind}/no_cache"][part]
        rows.append(Row(f"serve {kind} ({part}): TTFT p50, prefix cache vs none", on["ttft_ms"]["p50"],
                        off["ttft_ms"]["p50"], "ms", off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"],
                        f"cache hit rate {on['cache_hit_rate']:.0%}, Poisson {rate}/s seed {seed}; {json_path}"))
    j = report["json_constraint"]
    rows.append(Row("engine: decode per token, json_schema vs free", j["ms_per_token"]["json_schema"],
                    j["ms_per_token"]["free"], "ms/token",
                    j["ms_per_token"]["free"] / j["ms_per_token"]["json_schema"],
                    f"overhead {j['overhead_ms_per_token']:.3f} ms/token over {j['answer_tokens']} tokens "
                    "(llguidance)"))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_cache", description=__doc__)
    p.add_argument("--json", default="benchmarks/serve_cache.json", help="where to write the full metrics")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests per second")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print_table(run(rate=args.rate, seed=args.seed, json_path=args.json))
