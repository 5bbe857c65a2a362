"""Tokenizers: any HF tokenizer directory, read the way transformers reads it, and nanoseek's own BPE.

`load_tokenizer(dir)` takes what transformers' AutoTokenizer takes from a "fast" tokenizer directory:
tokenizer.json; tokenizer_config.json (bos/eos/pad/unk as strings or AddedToken dicts, added_tokens_decoder,
model_max_length); the chat template from chat_template.jinja and additional_chat_templates/*.jinja, else
tokenizer_config.json (a string, or a list of named templates), else a processor's chat_template.json; the
pad token from tokenizer.json's padding where the config names none; and the stop ids from
generation_config.json (`eos_token_id` may be a list). Chats render to the same text and ids as
`AutoTokenizer.apply_chat_template` (the Jinja semantics live in nanoseek/data/chat.py). `save(dir)` writes
a loaded directory's tokenizer files back unchanged, so a fine-tuned model keeps its tokenizer exactly.

nanoseek's own tokenizer (`train_tokenizer`) is one such layout. Why its choices:
  * byte-level: every string (Korean, Chinese, emoji, control characters) encodes losslessly,
    so decode(encode(s)) == s without an <unk> token;
  * digits split one per token (as DeepSeek-V3 and LLaMA do): with merged digit chunks "1234"
    and "123" are unrelated symbols and a tiny model cannot learn column arithmetic;
  * specials at the lowest ids in a fixed order, so ids do not move when the vocab size does:
    bos=0, eos=1, pad=2, then <｜User｜>, <｜Assistant｜>, <think>, </think>, <answer>, </answer>, then
    DeepSeek-V3's nine tool-call markers (nanoseek/data/tool_calls.py), appended last so the earlier ids
    stay where older tokenizers have them. The think/answer tags are single tokens but not "special" (as
    in DeepSeek's tokenizer), so decode(skip_special_tokens=True) keeps them and the reward parser still
    sees them. The tool markers are special, control tokens like <｜User｜>: a grammar that spells JSON
    text (llguidance) can then never put one inside a string of a call's arguments, where the parser would
    take it for the end of the call. A tokenizer trained before the markers existed loads and chats as
    before: its template writes them as plain text, which it encodes byte by byte.

Nothing downstream needs particular ids: the reasoning/answer split works on text, so `<think>` may be one
token, several, or absent from the vocabulary.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from nanoseek.data.chat import (ASSISTANT, BOS, CHAT_TEMPLATE, EOS, PAD, THINK_END, THINK_START, USER,
                                ChatTemplateError, opens_think, render_chat)
from nanoseek.data.corpus import iter_documents
from nanoseek.data.tool_calls import TOOL_MARKERS
from nanoseek.errors import UsageError

SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]      # control tokens: dropped by skip_special_tokens
TAG_TOKENS = [THINK_START, THINK_END, "<answer>", "</answer>"]  # single tokens, kept in decoded text
FIXED_TOKENS = SPECIAL_TOKENS + TAG_TOKENS + TOOL_MARKERS  # the lowest ids, in this order
MODEL_MAX_LENGTH = 512
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# the files a tokenizer directory may hold; save() copies those a loaded directory had
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")


class Tokenizer:
    """A `tokenizers.Tokenizer` with its special tokens, stop ids and chat template(s).

    special_tokens: the named specials as strings ({"bos_token": ..., "eos_token": ..., ...}); they are
    the variables a chat template sees. chat_template: a Jinja string, a {name: template} dict (the
    "default" one is used), or None (then only plain prompts work). extra_stop_ids: generation_config's
    eos ids beside the eos token. source: the directory it was loaded from (save() copies its files)."""

    def __init__(self, tk, chat_template: str | dict | None = CHAT_TEMPLATE, special_tokens: dict | None = None,
                 model_max_length: int | None = MODEL_MAX_LENGTH, extra_stop_ids: Iterable[int] = (),
                 source: Path | None = None):
        self.tk = tk
        self.chat_templates = chat_template if isinstance(chat_template, dict) else (
            {"default": chat_template} if chat_template else {})
        self.special_tokens = dict(special_tokens if special_tokens is not None else
                                   {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
        self.model_max_length = model_max_length
        self.source = source
        for name in ("bos_token", "eos_token", "pad_token"):  # the ones nanoseek encodes by id
            token = self.special_tokens.get(name)
            if token is not None and tk.token_to_id(token) is None:
                raise UsageError(f"the tokenizer's {name} {token!r} is not in its vocabulary: fix tokenizer_config.json")
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token") or self.eos_token  # pad = eos when there is none
        self.bos_id, self.eos_id = self._id(self.bos_token), self._id(self.eos_token)
        self.pad_id = self._id(self.pad_token) if self.pad_token else 0
        # generation stops at eos and at every id generation_config.json lists (Llama 3: <|eot_id|> too)
        self.stop_ids = sorted({i for i in [self.eos_id, *extra_stop_ids] if i is not None})
        if not self.stop_ids:
            raise UsageError("the tokenizer names no eos_token and generation_config.json no eos_token_id: "
                             "generation could never stop; set eos_token in tokenizer_config.json")
        if self.eos_id is None:
            self.eos_id = self.stop_ids[0]
        # `</think>` as one token (nanoseek's and DeepSeek's vocabularies), else None: a shortcut, never required
        self.think_end_id = tk.token_to_id(THINK_END)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]  # parallel in Rust
        return [[self.bos_id] + ids for ids in out] if add_bos and self.bos_id is not None else out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_completion(self, ids: Iterable[int]) -> str:
        """A generated completion's text, without the stop token it ended on (that is not part of the answer)."""
        ids = list(ids)
        return self.decode(ids[:-1] if ids and ids[-1] in self.stop_ids else ids)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        """Same semantics as transformers: the rendered string, or its ids when tokenize=True (the
        template writes bos itself, so no special tokens are added on top). kwargs reach the template."""
        if self.chat_template is None:
            named = f" (it has {', '.join(sorted(self.chat_templates))}, none named 'default')" if self.chat_templates else ""
            raise ChatTemplateError(f"this tokenizer has no default chat template{named}: use the plain prompt "
                                    "(--template r1-zero), or add a chat_template.jinja to the model directory")
        # a special the tokenizer lacks stays undefined in the template (renders ""), as in transformers
        tokens = {"bos_token": None, "eos_token": None, **self.special_tokens, **kwargs}
        text = render_chat(messages, add_generation_prompt, self.chat_template, **tokens)
        return self.encode(text) if tokenize else text

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for SFT on the assistant turns answering the last user message: the last turn, and
        in a tool-calling conversation also the calls before it (each prompt holds the previous completion,
        then the tools' outputs, which stay untrained like the tools header). Each prompt part is tokenized
        exactly as at generation time and each completion separately, so training and sampling see the same
        token boundary; mask is 1 on the completions (incl. the end-of-turn tokens).

        A completion is what the template renders after the generation prompt when that holds the turn's
        reasoning. Templates that drop the last turn's reasoning (DeepSeek-R1's own) or never render it
        (ChatML) get it written the R1 way: `[<think>\n]reasoning\n</think>\n\nanswer`, with `<think>` only
        where the generation prompt did not open the block already. Where a turn's prompt does not extend the
        text before it (such templates), only the last turn is trained."""
        if not messages or messages[-1].get("role") != "assistant":
            raise UsageError("a training conversation must end with an assistant turn")
        extra = {"tools": tools} if tools else {}
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        ids, mask, done = [], [], ""
        for i, m in enumerate(messages):
            if i <= last_user or m.get("role") != "assistant":
                continue
            prompt = self.apply_chat_template(messages[:i], add_generation_prompt=True, **extra)
            completion = self._completion(prompt, self.apply_chat_template(messages[:i + 1], **extra), m)
            if not prompt.startswith(done):  # the template rewrote earlier text: train this turn alone
                ids, mask, done = [], [], ""
            p_ids, c_ids = self.encode(prompt[len(done):]), self.encode(completion)
            ids, mask = ids + p_ids + c_ids, mask + [0] * len(p_ids) + [1] * len(c_ids)
            done = prompt + completion
        return ids, mask

    def _completion(self, prompt: str, full: str, turn: dict) -> str:
        """The text one assistant turn adds after its generation prompt (encode_chat's docstring)."""
        answer, reasoning = turn.get("content") or "", (turn.get("reasoning_content") or "").strip()
        completion = full[len(prompt):] if full.startswith(prompt) else None
        if completion is None or (reasoning and reasoning not in completion):
            at = full.rfind(answer) if answer else -1  # the template's end of turn follows the answer
            end = full[at + len(answer):] if at >= 0 else (self.eos_token or "")
            think = ("" if opens_think(prompt) else THINK_START + "\n") + f"{reasoning}\n{THINK_END}\n\n"
            completion = (think if reasoning else "") + answer + end
        return completion

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.source is not None:  # a loaded directory: its files, unchanged
            for name in TOKENIZER_FILES:
                if (self.source / name).is_file() and (self.source / name).resolve() != (out / name).resolve():
                    shutil.copyfile(self.source / name, out / name)
            extra = self.source / "additional_chat_templates"
            if extra.is_dir() and extra.resolve() != (out / extra.name).resolve():
                shutil.copytree(extra, out / extra.name, dirs_exist_ok=True)
            return out
        self.tk.save(str(out / "tokenizer.json"))
        config = {  # the fields transformers 5 writes, with a class name 4.x understands too
            "backend": "tokenizers",
            **self.special_tokens,
            "model_max_length": self.model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template:
            (out / "chat_template.jinja").write_text(self.chat_template)
        return out


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not readable JSON ({e}): restore it from the original model") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object")
    return data


def _chat_templates(p: Path, config: dict) -> str | dict | None:
    """The chat template(s) in transformers' order of precedence: template files over tokenizer_config.json.
    A processor's chat_template.json (which AutoTokenizer ignores) is used only where there is nothing else."""
    named = {}
    if (p / "chat_template.jinja").is_file():
        named["default"] = (p / "chat_template.jinja").read_text(encoding="utf-8")
    for f in sorted((p / "additional_chat_templates").glob("*.jinja")):
        named[f.stem] = f.read_text(encoding="utf-8")
    if named:
        return named
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        return {t["name"]: t["template"] for t in template}
    if template is None and (p / "chat_template.json").is_file():
        return _read_json(p / "chat_template.json").get("chat_template")
    return template


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load an HF tokenizer directory (or a bare tokenizer.json) as transformers would."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not p.exists():
        raise UsageError(f"{p} does not exist: give a model directory (HF layout) or a tokenizer directory")
    if not file.is_file():
        hint = (" (only a sentencepiece tokenizer.model: convert it once with transformers, "
                "AutoTokenizer.from_pretrained(d).save_pretrained(d))" if (p / "tokenizer.model").exists() else "")
        raise UsageError(f"{p} has no tokenizer.json{hint}: nanoseek reads HF 'fast' tokenizer directories")
    try:
        tk = HFTokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the Rust library's parse errors have no common type
        raise UsageError(f"{file} is not a valid tokenizer.json ({e})") from e
    padding = tk.padding  # transformers never applies tokenizer.json's padding or truncation, but takes its pad token
    tk.no_padding()
    tk.no_truncation()
    if not p.is_dir():
        return Tokenizer(tk)
    config = _read_json(p / "tokenizer_config.json") if (p / "tokenizer_config.json").is_file() else {}
    # tokens transformers adds on load: those in added_tokens_decoder that tokenizer.json lacks
    missing = [v for v in (config.get("added_tokens_decoder") or {}).values()
               if isinstance(v, dict) and tk.token_to_id(v.get("content", "")) is None]
    for v in missing:
        token = AddedToken(v["content"], single_word=v.get("single_word", False), lstrip=v.get("lstrip", False),
                           rstrip=v.get("rstrip", False), normalized=v.get("normalized", not v.get("special")),
                           special=v.get("special", False))
        (tk.add_special_tokens if v.get("special") else tk.add_tokens)([token])
    legacy = _read_json(p / "special_tokens_map.json") if (p / "special_tokens_map.json").is_file() else {}
    specials = {name: _token_text(config.get(name, legacy.get(name))) for name in NAMED_SPECIALS}
    specials["pad_token"] = specials["pad_token"] or (padding or {}).get("pad_token")
    extra_stops: list[int] = []
    if (p / "generation_config.json").is_file():
        eos = _read_json(p / "generation_config.json").get("eos_token_id")
        extra_stops = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    max_len = config.get("model_max_length")
    return Tokenizer(tk, _chat_templates(p, config), {k: v for k, v in specials.items() if v},
                     int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,
                     extra_stops, source=p)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, out_dir: str | Path | None = None,
                    min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on an iterable of strings; optionally save to out_dir.
    vocab_size is an upper bound: training stops early when no pair occurs min_frequency
    times (the synthetic task corpus saturates near 600 tokens; add real text for more)."""
    n_fixed = len(FIXED_TOKENS) + 256
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
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in FIXED_TOKENS],
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
