"""Load test of `nanoseek serve`: N concurrent streaming clients vs the same N requests one at a time.

The server batches concurrent requests in one engine loop, so N clients should finish in far less than
N times one client's time. Tiny random model (preset "tiny"), fixed-length answers (ignore_eos).
Run alone: python -m benchmarks.serve_load
"""
from __future__ import annotations

import threading

import torch

from benchmarks.common import Row, time_pair

CLIENTS, TOKENS = 8, 64


def _stream(client, prompt: str) -> int:
    n = 0
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=TOKENS, temperature=1.0, stream=True,
                                                extra_body={"ignore_eos": True}):
        n += sum(bool(c.delta.content or (c.delta.model_extra or {}).get("reasoning_content")) for c in chunk.choices)
    return n


def run(reps: int = 3, preset: str = "tiny", clients: int = CLIENTS) -> list[Row]:
    import openai

    from nanoseek.config import get_preset
    from nanoseek.infer.server import BackgroundServer, Options
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog, 0123456789."] * 50, vocab_size=600)
    torch.manual_seed(0)
    model = Transformer(get_preset(preset).replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                   eos_token_id=tok.eos_id)).eval()
    opts = Options(served_model_name="tiny", max_batch=max(16, clients), max_len=512, shutdown_timeout=5)
    prompts = [f"client {i}: tell me about the quick brown fox" for i in range(clients)]
    with BackgroundServer(opts, model=model, tokenizer=tok) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

        def concurrent():
            threads = [threading.Thread(target=_stream, args=(client, p)) for p in prompts]
            [t.start() for t in threads]
            [t.join() for t in threads]

        def sequential():
            for p in prompts:
                _stream(client, p)
        t_par, t_seq = time_pair(concurrent, sequential, reps=reps, warmup=1)
        peak = server.service.loop.stats["peak_running"]
    tokens = clients * TOKENS
    note = f"{clients} clients x {TOKENS} tokens, preset {preset}, peak batch {peak}"
    return [Row(f"serve: {clients} streaming clients, tokens/s", tokens / t_par, tokens / t_seq, "tokens/s",
                t_seq / t_par, note + " (reference: one request at a time)"),
            Row(f"serve: {clients} streaming clients, requests/s", clients / t_par, clients / t_seq, "req/s",
                t_seq / t_par, "same runs")]


if __name__ == "__main__":
    from benchmarks.common import print_table
    print_table(run())
