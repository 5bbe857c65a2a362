"""Byte-level BPE tokenizer with DeepSeek's special tokens, trained with HF `tokenizers`.

Why these choices:
  * byte-level: every string (Korean, Chinese, emoji, control characters) encodes losslessly,
    so decode(encode(s)) == s without an <unk> token;
  * digits split one per token (as DeepSeek-V3 and LLaMA do): with merged digit chunks "1234"
    and "123" are unrelated symbols and a tiny model cannot learn column arithmetic;
  * specials at the lowest ids in a fixed order, so ids do not move when the vocab size does:
    bos=0, eos=1, pad=2, then <｜User｜>, <｜Assistant｜>, <think>, </think>, <answer>, </answer>.
    The think/answer tags are single tokens but not "special" (as in DeepSeek's tokenizer), so
    decode(skip_special_tokens=True) keeps them and the reward parser still sees them.

`save(dir)` writes tokenizer.json, tokenizer_config.json and chat_template.jinja the way
transformers 5 does, so `AutoTokenizer.from_pretrained(dir)` loads it and renders chats exactly
as we do.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from nanoseek.data.chat import (ASSISTANT, BOS, CHAT_TEMPLATE, EOS, PAD, THINK_END, THINK_START, USER,
                                render_chat)

SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]      # control tokens: dropped by skip_special_tokens
TAG_TOKENS = [THINK_START, THINK_END, "<answer>", "</answer>"]  # single tokens, kept in decoded text
MODEL_MAX_LENGTH = 512


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids and the chat template we need."""

    def __init__(self, tk, chat_template: str = CHAT_TEMPLATE, model_max_length: int = MODEL_MAX_LENGTH):
        self.tk = tk
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        ids = {t: tk.token_to_id(t) for t in SPECIAL_TOKENS + TAG_TOKENS[:2]}  # <answer> tags optional
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.user_id, self.assistant_id = ids[USER], ids[ASSISTANT]
        self.think_start_id, self.think_end_id = ids[THINK_START], ids[THINK_END]
        self.bos_token, self.eos_token, self.pad_token = BOS, EOS, PAD

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]  # parallel in Rust
        return [[self.bos_id] + ids for ids in out] if add_bos else out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False):
        """Same semantics as transformers: the rendered string, or its ids when tokenize=True
        (the template writes bos itself, so no special tokens are added on top)."""
        text = render_chat(messages, add_generation_prompt, self.chat_template, BOS, EOS)
        return self.encode(text) if tokenize else text

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for SFT on the last assistant turn: the prompt part is tokenized exactly
        as at generation time (ending in `<think>\\n`) and the completion separately, so training
        and sampling see the same token boundary; mask is 1 on the completion (incl. eos)."""
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("encode_chat needs a conversation that ends with an assistant turn")
        prompt = self.apply_chat_template(messages[:-1], add_generation_prompt=True)
        full = self.apply_chat_template(messages)
        assert full.startswith(prompt), "chat template must render the prompt as a prefix"
        p_ids, c_ids = self.encode(prompt), self.encode(full[len(prompt):])
        return p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(out / "tokenizer.json"))
        config = {  # the fields transformers 5 writes, with a class name 4.x understands too
            "backend": "tokenizers",
            "bos_token": BOS,
            "eos_token": EOS,
            "model_max_length": self.model_max_length,
            "pad_token": PAD,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").write_text(self.chat_template)
        return out


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from a directory holding tokenizer.json (ours or any HF one with our specials)."""
    from tokenizers import Tokenizer as HFTokenizer
    p = Path(path)
    tk = HFTokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
    template, max_len = CHAT_TEMPLATE, MODEL_MAX_LENGTH
    if p.is_dir():
        if (p / "chat_template.jinja").exists():
            template = (p / "chat_template.jinja").read_text()
        if (p / "tokenizer_config.json").exists():
            max_len = int(json.loads((p / "tokenizer_config.json").read_text()).get("model_max_length", max_len))
    return Tokenizer(tk, template, max_len)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, out_dir: str | Path | None = None,
                    min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on an iterable of strings; optionally save to out_dir.
    vocab_size is an upper bound: training stops early when no pair occurs min_frequency
    times (the synthetic task corpus saturates near 600 tokens; add real text for more)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    n_fixed = len(SPECIAL_TOKENS) + len(TAG_TOKENS) + 256
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size must be at least {n_fixed} (specials + 256 bytes)")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        # the trainer puts these first, in this order: that fixes their ids
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + TAG_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
    )
    tk.train_from_iterator(texts, trainer=trainer)
    # the trainer marks every token it is given as special; un-mark the tags in the serialized form
    spec = json.loads(tk.to_str())
    for t in spec["added_tokens"]:
        t["special"] = t["content"] not in TAG_TOKENS
    tok = Tokenizer(HFTokenizer.from_str(json.dumps(spec)))
    if out_dir is not None:
        tok.save(out_dir)
    return tok


# --------------------------------------------------------------------------------------------
# `nanoseek tokenizer`

@dataclass
class Options:
    out: str = field(default="runs/tokenizer", metadata={"help": "output directory"})
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size including special tokens"})
    n_docs: int = field(default=20000, metadata={"help": "documents drawn from the default task corpus"})
    text_files: list[str] = field(default_factory=list, metadata={
        "help": "extra text files / JSONL / Parquet / HF dataset dirs, comma separated"})
    seed: int = field(default=0, metadata={"help": "corpus seed"})


def run(opts: Options) -> Tokenizer:
    from nanoseek.data.corpus import iter_documents
    t0 = time.time()
    docs = list(iter_documents(opts.n_docs, seed=opts.seed, files=opts.text_files))
    print(f"training a byte-level BPE tokenizer (vocab {opts.vocab_size}) on {len(docs)} documents "
          f"({sum(map(len, docs)) / 1e6:.1f}M characters)")
    tok = train_tokenizer(docs, opts.vocab_size, opts.out)
    sample = docs[0][:200]
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs[:1000]))
    n_chars = sum(len(d) for d in docs[:1000])
    print(f"vocab {tok.vocab_size} (asked for at most {opts.vocab_size}), {n_chars / max(n_tokens, 1):.2f} characters/token, {time.time() - t0:.1f}s")
    print(f"example: {sample!r}\n  -> {tok.encode(sample)[:40]} ...")
    print(f"wrote {Path(opts.out) / 'tokenizer.json'}, tokenizer_config.json, chat_template.jinja")
    return tok
