"""Generate completions for prompts with a nanoseek / HF-layout model (reasoning and answer shown apart)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from nanoseek.data.chat import PROMPT_TEMPLATES, describe_template, opens_think, parse_completion, question_prompt
from nanoseek.errors import UsageError
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.hf.load import from_pretrained
from nanoseek.tokenizer import load_tokenizer

POSITIONAL = (("model", "model directory (HF layout, with tokenizer files)"),)


@dataclass
class Options:
    model: str = field(default="", metadata={"help": "model directory"})
    prompt: list[str] = field(default_factory=lambda: ["What is 12 + 35?"],
                              metadata={"help": "a prompt; repeat the flag for several", "repeat": True})
    template: str = field(default="r1", metadata={
        "help": "r1 (the model's chat template), r1-zero (R1-Zero's plain prompt, for base models) or raw (as given)"})
    max_tokens: int = field(default=256, metadata={"help": "new tokens per completion"})
    temperature: float = field(default=0.6, metadata={"help": "0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "0 = off"})
    n: int = field(default=1, metadata={"help": "completions per prompt"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    speculative: bool = field(default=False, metadata={"help": "MTP self-speculative decoding (MoE models)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})


def load(model_dir: str, device: str = "cpu"):
    if not model_dir:
        raise SystemExit("error: give a model directory, e.g. nanoseek generate runs/speedrun/grpo/final")
    return from_pretrained(model_dir, device=device), load_tokenizer(model_dir)


def run(opts: Options) -> None:
    if opts.template not in (*PROMPT_TEMPLATES, "raw"):
        raise UsageError(f"--template must be one of {', '.join(PROMPT_TEMPLATES)} or raw, got {opts.template!r}")
    model, tok = load(opts.model, opts.device)
    if opts.template == "raw":
        texts = [(tok.bos_token or "") + p for p in opts.prompt]
        print("generate: raw prompts (bos + the text as given)")
    else:
        texts = [question_prompt(tok, p, opts.template) for p in opts.prompt]
        print(f"generate: {describe_template(tok, opts.template)}")
    prompts = [tok.encode(t) for t in texts]
    eng = Engine(model, tok, max_batch=max(1, len(prompts) * opts.n),
                 max_len=min(model.config.max_position_embeddings, max(map(len, prompts)) + opts.max_tokens),
                 speculative=opts.speculative)
    sp = SamplingParams(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, max_tokens=opts.max_tokens,
                        n=opts.n, seed=opts.seed)
    t0 = time.perf_counter()
    results = eng.generate(prompts, sp)
    dt = time.perf_counter() - t0
    n_tok = 0
    for p, text, r in zip(opts.prompt, texts, results):
        for o in r.outputs:
            n_tok += len(o.token_ids)
            parsed = parse_completion(o.text, opened_think=opens_think(text))
            print(f"\n### {p}  [sample {o.index}, {len(o.token_ids)} tokens, {o.finish_reason}]")
            if parsed.reasoning is not None:
                print(f"--- reasoning ---\n{parsed.reasoning.strip()}\n--- answer ---")
            print(parsed.answer.strip())
    extra = f", MTP acceptance {eng.acceptance_rate:.0%}" if opts.speculative else ""
    print(f"\n{n_tok} tokens in {dt:.2f} s ({n_tok / dt:.1f} tokens/s){extra}")
