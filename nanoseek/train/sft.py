"""`nanoseek sft`: supervised fine-tuning on chat data (R1's cold start, rejection-sampling SFT).

Each conversation is rendered with the model's chat template; the loss covers only the last
assistant turn (reasoning + answer + eos), exactly the tokens the model produces after the
generation prompt. Examples are packed whole into rows with document ids, so no attention and
no target crosses from one example into another. MTP keeps training (a stale MTP head would
spoil speculative decoding later).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.data.coldstart import coldstart_dataset, require_solvers
from nanoseek.data.sources import column_option, load_chat
from nanoseek.data.tool_use import mix_in, tool_use_count, tool_use_dataset
from nanoseek.hf.load import from_pretrained
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.data import BatchIterator, pack_examples
from nanoseek.train.pretrain import finish, start_run
from nanoseek.train.run_options import stage_default
from nanoseek.train.trainer import TrainOptions, Trainer


POSITIONAL = (("model", "model directory (HF layout with tokenizer) to fine-tune; or --model", True),)


@dataclass
class Options(TrainOptions):
    model: str = field(default="", metadata={"help": "model directory (HF layout with tokenizer) to fine-tune"})
    data: str = field(default="", metadata={
        "help": "chat data: JSONL / JSON / Parquet / CSV or a datasets folder with {\"messages\": [...]} rows, or "
                "prompt + answer rows (one user and one assistant turn each) (default: the built-in cold-start set)"})
    prompt_field: str = column_option("prompt")
    answer_field: str = column_option("answer")
    n_examples: int = field(default=2000, metadata={"help": "built-in cold-start examples when --data is not given"})
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "tasks of the built-in cold-start set, comma separated (default: every task with a solver)"})
    difficulty: int | None = field(default=None, metadata={
        "help": "difficulty of the built-in cold-start set (none = mixed over each task's range)"})
    max_difficulty: int = field(default=0, metadata={
        "help": "with --difficulty none: the highest level of the mix (0 = each task's whole range)"})
    tool_share: float = field(default=0.0, metadata={
        "help": "share of the built-in cold-start set that is calculator tool-use conversations (the tool the web "
                "chat offers), e.g. 0.05; skipped when the chat template cannot render tool calls. Off by default: "
                "the tiny model learns the call's format but not yet to copy the operands (README, Serving)"})
    steps: int = stage_default(TrainOptions, "steps", 150)
    lr: float = stage_default(TrainOptions, "lr", 1e-3)
    warmup_steps: int = stage_default(TrainOptions, "warmup_steps", 10)
    mtp_weight: float = field(default=0.1, metadata={"help": "MTP loss weight lambda (V3's late value)"})


def read_chat_jsonl(path: str | Path, prompt_field: str = "", answer_field: str = "") -> list[dict]:
    """Chat records ({"messages": [...]}) from any data file sources.py reads (the name is historical:
    JSON, Parquet, CSV and datasets folders work too; prompt + answer rows become two turns)."""
    return load_chat(path, prompt_field, answer_field)


def encode_records(tok, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) per conversation ending in an assistant turn (with its "tools", if any); the others
    are skipped."""
    usable = [r for r in records if r["messages"] and r["messages"][-1].get("role") == "assistant"]
    if len(usable) < len(records):
        print(f"sft: skipped {len(records) - len(usable)} conversations that do not end with an assistant turn")
    return [tok.encode_chat(r["messages"], r.get("tools")) for r in usable]


def sft(opts: Options) -> Path:
    """Fine-tune opts.model; returns the final model directory (HF layout, with tokenizer)."""
    if not opts.model:
        raise SystemExit("sft: a model directory is required: nanoseek sft DIR "
                         "(e.g. the final/ folder of a pretrain run)")
    t0 = time.time()
    tool_examples = []
    if opts.data:  # the data first: a bad file fails before the run folder exists or the model loads
        records, source = read_chat_jsonl(opts.data, opts.prompt_field, opts.answer_field), opts.data
    else:
        require_solvers(opts.tasks, "sft")
    tok = load_tokenizer(opts.model)
    if not opts.data:
        n_tools = tool_use_count(tok, opts.n_examples, opts.tool_share)
        records = coldstart_dataset(opts.n_examples - n_tools, opts.tasks or None, opts.difficulty, seed=opts.seed,
                                    max_difficulty=opts.max_difficulty or None)
        tool_examples = encode_records(tok, tool_use_dataset(n_tools, seed=opts.seed))
        source = "built-in cold-start set" + (f" ({n_tools} of them calculator tool use)" if n_tools else "")
    examples = mix_in(encode_records(tok, records), tool_examples, seed=opts.seed)  # the template must render all
    # a tool-use conversation is kept whole (its tools header alone is ~170 tokens of the speedrun's tiny
    # vocabulary): the rows grow to fit the longest one
    seq_len = max([opts.seq_len] + [len(ids) - 1 for ids, _ in tool_examples])
    model = from_pretrained(opts.model)
    out = start_run(opts, "sft")  # after everything that can refuse the run
    print(f"sft: run folder {out}, model {opts.model}")
    data = pack_examples(examples, seq_len, tok.pad_id)
    n_train = int(data.mask[:, 1:].sum())
    print(f"data: {len(examples)} conversations from {source} packed into {len(data)} rows of {seq_len + 1} "
          f"({n_train:,} assistant tokens trained on, {n_train / data.tokens.numel():.0%} of the rows)")
    trainer = Trainer(model, opts, BatchIterator(data, opts.batch_size, seed=opts.seed), out)
    row = trainer.fit()
    return finish(trainer, opts, out, tok, row, "sft", t0)


def run(opts: Options) -> None:
    sft(opts)
