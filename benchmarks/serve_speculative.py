"""MTP speculation on and off: decode tokens/s of the engine at batch 1 and 16, greedy and T = 0.6.

A trained model with an MTP module (the speedrun's GRPO model by default; a random MTP head accepts
almost nothing) answers arithmetic questions in its chat template until its own end of answer (at most
96 tokens). Plain and speculative engines on the same weights run in turn within every repetition
(medians), so the machine's drift hits both alike; each speculative row's note has its acceptance rate.
tokens/s counts generated tokens over the wall time of `Engine.generate` (prefill included).
Run alone: python -m benchmarks.serve_speculative [--model DIR] [--json PATH]
(python -m benchmarks --only serve_speculative; the model from env NANOSEEK_SPEC_MODEL there)
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.common import Row, print_table, time_alternating, write_json

MODEL = os.environ.get("NANOSEEK_SPEC_MODEL", "runs/speedrun/grpo/final")
QUESTIONS = ["What is 47 + 38?", "What is 12 + 35?", "What is 9 * 7?", "What is 81 - 29?",
             "What is 56 + 17?", "What is 23 * 4?", "What is 90 - 45?", "What is 64 + 29?"]
MAX_TOKENS = 96


def _setup(model_dir: str):
    from nanoseek.data.chat import question_prompt
    from nanoseek.hf.load import from_pretrained
    from nanoseek.tokenizer import load_tokenizer
    if not Path(model_dir, "config.json").is_file():
        raise SystemExit(f"serve_speculative: no model at {model_dir!r}; train one (nanoseek speedrun) or pass --model "
                         "(or NANOSEEK_SPEC_MODEL) a directory of a model with an MTP module")
    model, tok = from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    return model, tok, [tok.encode(question_prompt(tok, q, "r1")) for q in QUESTIONS]


def run(reps: int = 5, model_dir: str = MODEL) -> list[Row]:
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    model, tok, prompts = _setup(model_dir)
    engines = {spec: Engine(model, tok, max_batch=16, max_len=256, speculative=spec) for spec in (False, True)}
    rows = []
    for batch in (1, 16):
        for temp in (0.0, 0.6):
            ps = [prompts[i % len(prompts)] for i in range(batch)]
            sp = SamplingParams(temperature=temp, top_p=0.95 if temp else 1.0, max_tokens=MAX_TOKENS, seed=0)
            made = {False: [0, 0.0], True: [0, 0.0]}  # tokens, seconds over the timed runs (and warm-up)

            def gen(spec: bool):
                t = time.perf_counter()
                outs = engines[spec].generate(ps, sp)
                made[spec][0] += sum(len(o.token_ids) for r in outs for o in r.outputs)
                made[spec][1] += time.perf_counter() - t
            engines[True].spec_stats.update(drafted=0, accepted=0)
            t_plain, t_spec = time_alternating([lambda: gen(False), lambda: gen(True)], reps)
            # median seconds per run, tokens per run on average (sampled answers differ in length)
            tps = {s: made[s][0] / (reps + 1) / t for s, t in ((False, t_plain), (True, t_spec))}
            acc = engines[True].acceptance_rate
            rows.append(Row(f"speculative decode, batch {batch}, T={temp:g}", tps[True], tps[False], "tokens/s",
                            tps[True] / tps[False], f"MTP acceptance {acc:.1%}, {torch.get_num_threads()} threads"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default="benchmarks/serve_speculative.json")
    args = p.parse_args()
    rows = run(args.reps, args.model)
    print_table(rows)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
