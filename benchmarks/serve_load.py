"""Serving under load: N concurrent streaming clients vs the same N requests one after another.

A real `nanoseek serve` (uvicorn on a free 127.0.0.1 port, the batching engine, a small random MoE)
is driven over HTTP by N threads, each streaming one /v1/completions request of a fixed length
(ignore_eos), against the same N requests sent sequentially. Continuous batching should turn the
N decode streams into one batched forward per step, so ratio = concurrent / sequential throughput.

    python -m benchmarks.serve_load [--clients 8] [--tokens 32] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading

import httpx
import torch

from benchmarks.common import Row, print_table, time_pair


def _model_dir(path: str, preset: str) -> None:
    from nanoseek.config import get_preset
    from nanoseek.data.corpus import default_corpus
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(default_corpus(300), vocab_size=512)
    cfg = get_preset(preset).replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     max_position_embeddings=512)
    torch.manual_seed(0)
    Transformer(cfg).eval().save_pretrained(path, tokenizer=tok)


def _stream_one(url: str, model: str, tokens: int, i: int) -> int:
    """One streaming request; returns the completion tokens the server reports."""
    body = {"model": model, "prompt": f"request {i}: the quick brown fox", "max_tokens": tokens, "stream": True,
            "ignore_eos": True, "temperature": 1.0, "seed": i, "stream_options": {"include_usage": True}}
    used = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                used = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", used)
    return used


def run(reps: int = 3, clients: int = 8, tokens: int = 32, preset: str = "tiny") -> list[Row]:
    from nanoseek.infer.server import BackgroundServer, Options

    with tempfile.TemporaryDirectory() as d:
        _model_dir(d, preset)
        opts = Options(model=d, max_batch=clients, max_queue=clients, shutdown_timeout=5)
        with BackgroundServer(opts) as srv:
            name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
            counts: list[int] = []

            def concurrent():
                threads = [threading.Thread(target=lambda i=i: counts.append(_stream_one(srv.url, name, tokens, i)))
                           for i in range(clients)]
                [t.start() for t in threads]
                [t.join() for t in threads]

            def sequential():
                for i in range(clients):
                    counts.append(_stream_one(srv.url, name, tokens, i))

            t_conc, t_seq = time_pair(concurrent, sequential, reps=reps, warmup=1)
    # every request must have run to its full length, or the rates below compare different work
    assert counts and all(c == tokens for c in counts), f"short completions: {sorted(set(counts))}"
    n_tok = clients * tokens
    note = f"{clients} clients x {tokens} tokens, preset {preset}, {torch.get_num_threads()} threads"
    return [Row(f"serve: {clients} streaming requests", clients / t_conc, clients / t_seq, "req/s", t_seq / t_conc,
                note + "; reference = same requests sequentially"),
            Row(f"serve: {clients} streaming requests", n_tok / t_conc, n_tok / t_seq, "tokens/s", t_seq / t_conc,
                note + "; reference = same requests sequentially")]


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--preset", default="tiny")
    a = p.parse_args()
    print_table(run(reps=a.reps, clients=a.clients, tokens=a.tokens, preset=a.preset))
