"""Small HF tokenizer directories in the layouts real checkpoints ship, for tokenizer parity tests.

Each `build_<name>(d)` writes one directory and returns its path. The directories are made the way
the originals are: a byte-level BPE trained here with `tokenizers` on a few hundred short strings
(milliseconds), wrapped in a transformers tokenizer class and written with `save_pretrained`, then
patched by hand where a real checkpoint holds something `save_pretrained` does not write (special
tokens given as AddedToken dicts, `added_tokens_decoder`, a template inside tokenizer_config.json, a
list of named templates, `chat_template.json`, truncation/padding inside tokenizer.json). The chat
templates are written for these fixtures in the style of the real ones; they are not copies.

    LAYOUTS              {name: builder}
    build_all(tmp_dir)   {name: path}, one subdirectory per layout
    build_no_template(d), build_without_tokenizer_json(d)   the broken directories error tests need

Layouts (ids are small: every vocabulary is a few hundred tokens):
  nanoseek               nanoseek's own `train_tokenizer` output, as is
  deepseek_r1            DeepSeek-V3/R1: bos/eos/pad at ids 0-2, <｜User｜>/<｜Assistant｜> special,
                         <think>/</think> single non-special tokens, template in tokenizer_config.json
                         with a `namespace` system prompt and earlier reasoning dropped, specials given
                         as AddedToken dicts, added_tokens_decoder, tokenizer_class LlamaTokenizerFast,
                         a TemplateProcessing post-processor that adds bos, generation_config eos an int
  r1_distill_qwen        Qwen vocabulary (<|endoftext|>, <|im_start|>, <|im_end|> special) with DeepSeek's
                         markers added (not special), pad = eos, generation_config eos a list of two
  qwen25_chatml          Qwen2Tokenizer (NFC + Qwen split regex), ChatML with a default system prompt, no
                         think tokens, eos <|im_end|>, pad <|endoftext|>, no bos, chat_template.jinja
  qwen25_config_template the same with the template inside tokenizer_config.json (transformers 4 style)
  llama3                 Llama-3 headers, `strftime_now` date line, `raise_exception` on a bad role, no
                         pad, clean_up_tokenization_spaces true, generation_config eos [end_of_text, eot]
  llama3_json_trunc_pad  llama3 whose tokenizer.json holds truncation (8 tokens) and padding settings, and
                         whose tokenizer_config has no pad_token (transformers takes it from the padding)
  template_list          tokenizer_config chat_template = [{"name": "default"}, {"name": "tool_use"}];
                         the default template writes `{{ bos_token }}` though the layout has no bos
  additional_templates   chat_template.jinja + additional_chat_templates/tool_use.jinja (transformers 5
                         multi-template layout) + a stale, different template left in tokenizer_config
  chat_template_json     a processor-style chat_template.json ({"chat_template": ...}) next to the
                         tokenizer's own template in tokenizer_config.json (AutoTokenizer reads only
                         the latter; chat_template.json is read by AutoProcessor)
  whitespace_template    multi-line `{% ... %}` lines whose output depends on trim_blocks/lstrip_blocks,
                         `tojson` on non-ASCII/HTML characters, `loop.last`, `namespace`, reading the
                         `thinking` alias of reasoning_content, `is defined` on a None-valued key
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Callable

# --------------------------------------------------------------------------------------------
# token strings

DS_BOS = "<｜begin▁of▁sentence｜>"
DS_EOS = "<｜end▁of▁sentence｜>"
DS_PAD = "<｜▁pad▁｜>"
DS_USER = "<｜User｜>"
DS_ASSISTANT = "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"

QWEN_EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

L3_BOS, L3_EOS = "<|begin_of_text|>", "<|end_of_text|>"
L3_START_HEADER, L3_END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
L3_EOT, L3_EOM, L3_PAD = "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>"
L3_SPECIALS = [L3_BOS, L3_EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", L3_PAD,
               "<|reserved_special_token_2|>", L3_START_HEADER, L3_END_HEADER, L3_EOM, L3_EOT, "<|python_tag|>"]

LLAMA3_BAD_ROLE_MESSAGE = "Roles must be user or assistant after an optional system message, got "


# --------------------------------------------------------------------------------------------
# a small corpus: words, numbers, punctuation, Korean, Chinese, accents, emoji, newlines

def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("the a quick brown fox jumps over lazy dog answer question think step sum product number "
             "list sort order reason model token chat user assistant system hello world please what is "
             "how many because first then finally result check again careful solver").split()
    other = ["안녕하세요", "감사합니다", "한국어", "문장입니다", "딥시크", "모델", "中文", "测试", "数字", "你好",
             "café", "naïve", "Ωmega", "→", "😀", "🚀", "👍", "✅", "🤖"]
    punct = [".", ",", "?", "!", ":", ";", " +", " *", " =", " (", ")", "'s", "\n", "\n\n", "  "]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 12)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(words))
            elif r < 0.75:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 5))))
            elif r < 0.9:
                parts.append(rng.choice(other))
            else:
                parts.append(rng.choice(punct))
        out.append(" ".join(parts))
    return out


# --------------------------------------------------------------------------------------------
# BPE training (cached as JSON: each builder gets a fresh Tokenizer object)

def _regex(pattern: str):
    from tokenizers import Regex
    return Regex(pattern)


def _pre_tokenizer(kind: str):
    from tokenizers import pre_tokenizers as pt
    if kind == "deepseek":  # digits in groups of up to 3, CJK runs alone, then words / punctuation / spaces
        return pt.Sequence([
            pt.Split(_regex(r"\p{N}{1,3}"), behavior="isolated"),
            pt.Split(_regex(r"[\p{Han}\p{Hiragana}\p{Katakana}]+"), behavior="isolated"),
            pt.Split(_regex(r"[^\r\n\p{L}\p{N}]?\p{L}+|\s?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                     behavior="isolated"),
            pt.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if kind == "qwen":  # the pre-tokenizer Qwen2Tokenizer builds itself (read from transformers, not copied)
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
        return pt.Sequence([pt.Split(_regex(PRETOKENIZE_REGEX), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if kind == "llama3":  # contractions, words, numbers in groups of up to 3, punctuation, spaces
        return pt.Sequence([
            pt.Split(_regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
            pt.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(kind)


@lru_cache(maxsize=None)
def _trained_json(kind: str, vocab_size: int, leading_specials: tuple[str, ...]) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    if kind == "qwen":
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = _pre_tokenizer(kind)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in leading_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus(), trainer=trainer)
    return tk.to_str()


def _bpe(kind: str, vocab_size: int = 500, leading_specials: tuple[str, ...] = ()):
    from tokenizers import Tokenizer
    return Tokenizer.from_str(_trained_json(kind, vocab_size, leading_specials))


def _added(content: str, special: bool, normalized: bool | None = None):
    from tokenizers import AddedToken
    return AddedToken(content, special=special, normalized=(not special) if normalized is None else normalized)


def _add(tk, tokens: list[str], special: bool, normalized: bool | None = None) -> None:
    """Append tokens one by one (ids in list order), marked special or not."""
    for t in tokens:
        tok = _added(t, special, normalized)
        (tk.add_special_tokens if special else tk.add_tokens)([tok])


# --------------------------------------------------------------------------------------------
# file helpers

def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _patch_config(d: Path, **updates) -> dict:
    """Update tokenizer_config.json; a value of None deletes the key (use the string 'null' for JSON null)."""
    cfg = _read_json(d / "tokenizer_config.json")
    for k, v in updates.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = None if v == "null" else v
    _write_json(d / "tokenizer_config.json", cfg)
    return cfg


def _added_token_dict(tok, with_type: bool = True) -> dict:
    d = {"content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized, "rstrip": tok.rstrip,
         "single_word": tok.single_word, "special": tok.special}
    return {"__type": "AddedToken", **d} if with_type else d


def _generation_config(d: Path, **fields) -> None:
    _write_json(d / "generation_config.json", {"_from_model_config": True, **fields, "transformers_version": "4.46.3"})


def _save_fast(d: Path, tk, **kwargs) -> Path:
    """Wrap a `tokenizers.Tokenizer` in PreTrainedTokenizerFast and save it the way transformers does."""
    from transformers import PreTrainedTokenizerFast
    d.mkdir(parents=True, exist_ok=True)
    save_jinja = kwargs.pop("save_jinja_files", True)
    PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs).save_pretrained(str(d), save_jinja_files=save_jinja)
    return d


# --------------------------------------------------------------------------------------------
# chat templates (written for these fixtures, in the style of the real ones)

DEEPSEEK_TEMPLATE = (
    "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', first_system=true) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if ns.first_system %}{% set ns.system_prompt = message['content'] %}{% set ns.first_system = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

CHATML_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant. Answer briefly.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# the same format without a default system prompt, writing bos_token (undefined in a layout without bos)
CHATML_PLAIN_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CHATML_TOOL_TEMPLATE = """{{- '<|im_start|>system\\nYou may call these tools:\\n' }}
{%- for tool in tools %}
    {{- tool | tojson + '\\n' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

STALE_TEMPLATE = "{% for message in messages %}OLD TEMPLATE {{ message['content'] }}\n{% endfor %}"

PROCESSOR_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful vision assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'image' %}
                {%- set image_count.value = image_count.value + 1 %}
                {{- 'Picture ' + image_count.value|string + ': <|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif part['type'] == 'text' %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "01 Jan 2025" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Knowledge cutoff: 2024\\n" }}
{{- "Current date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("BAD_ROLE_MESSAGE" + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
""".replace("BAD_ROLE_MESSAGE", LLAMA3_BAD_ROLE_MESSAGE)

# No `-` whitespace control at all: what it renders depends on trim_blocks and lstrip_blocks.
WHITESPACE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(users=0) %}
{% for message in messages %}
    {% if message.role == 'system' %}
<|system|>
{{ message.content | trim }}
    {% elif message.role == 'user' %}
        {% set ns.users = ns.users + 1 %}
<|user|> #{{ ns.users }} {{ message.content | tojson }}
    {% elif message.role == 'assistant' %}
<|assistant|>
        {% if message.reasoning_content is defined %}
            {% if loop.last %}
[thinking] {{ message.thinking }}
            {% else %}
[thinking dropped]
            {% endif %}
        {% endif %}
{{ message.content }}{% if not loop.last %}{{ eos_token }}{% endif %}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""

# --------------------------------------------------------------------------------------------
# builders


def build_nanoseek(d) -> Path:
    from nanoseek.tokenizer import train_tokenizer
    d = Path(d)
    train_tokenizer(corpus(), vocab_size=600, out_dir=d)
    return d


def _deepseek_tokenizer():
    from tokenizers import processors
    tk = _bpe("deepseek", 520, (DS_BOS, DS_EOS, DS_PAD))  # ids 0, 1, 2 as in DeepSeek-V3
    _add(tk, ["<｜place▁holder▁no▁0｜>", "<｜place▁holder▁no▁1｜>"], special=True)
    _add(tk, [DS_USER, DS_ASSISTANT], special=True)
    _add(tk, [THINK_START, THINK_END], special=False, normalized=True)
    _add(tk, ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"], special=False)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{DS_BOS}:0 $A:0", pair=f"{DS_BOS}:0 $A:0 {DS_BOS}:1 $B:1", special_tokens=[(DS_BOS, 0)])
    return tk


def build_deepseek_r1(d) -> Path:
    d = Path(d)
    tk = _deepseek_tokenizer()
    _save_fast(d, tk, bos_token=DS_BOS, eos_token=DS_EOS, pad_token=DS_PAD, model_max_length=16384,
               chat_template=DEEPSEEK_TEMPLATE, save_jinja_files=False)
    decoder = tk.get_added_tokens_decoder()
    by_content = {t.content: t for t in decoder.values()}

    def special(t):  # as DeepSeek's config writes them (normalized: true, which the loader accepts)
        return {**_added_token_dict(by_content[t]), "normalized": True}
    cfg = _read_json(d / "tokenizer_config.json")
    cfg = {  # the key set and order of DeepSeek-V3/R1's tokenizer_config.json
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": special(DS_BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": special(DS_EOS),
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": special(DS_PAD),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": cfg["chat_template"],
        "added_tokens_decoder": {str(i): _added_token_dict(t, with_type=False) for i, t in sorted(decoder.items())},
    }
    _write_json(d / "tokenizer_config.json", cfg)
    _generation_config(d, bos_token_id=tk.token_to_id(DS_BOS), eos_token_id=tk.token_to_id(DS_EOS),
                       do_sample=True, temperature=0.6, top_p=0.95)
    return d


def build_r1_distill_qwen(d) -> Path:
    from tokenizers import processors
    d = Path(d)
    tk = _bpe("qwen", 480)
    _add(tk, [QWEN_EOT, IM_START, IM_END], special=True)
    _add(tk, [DS_BOS, DS_EOS], special=True)
    _add(tk, [DS_USER, DS_ASSISTANT, THINK_START, THINK_END], special=False)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{DS_BOS}:0 $A:0", pair=f"{DS_BOS}:0 $A:0 {DS_BOS}:1 $B:1",
        special_tokens=[(DS_BOS, tk.token_to_id(DS_BOS))])
    _save_fast(d, tk, bos_token=DS_BOS, eos_token=DS_EOS, pad_token=DS_EOS, model_max_length=16384,
               chat_template=DEEPSEEK_TEMPLATE, save_jinja_files=False)
    _patch_config(d, tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=False,
                  legacy=True, use_default_system_prompt=False, unk_token="null", backend=None)
    _generation_config(d, bos_token_id=tk.token_to_id(DS_BOS),
                       eos_token_id=[tk.token_to_id(DS_EOS), tk.token_to_id(QWEN_EOT)],
                       do_sample=True, temperature=0.6, top_p=0.95)
    return d


def _save_qwen(d: Path, chat_template, save_jinja_files: bool = True):
    """A Qwen2.5 tokenizer written by transformers' own Qwen2Tokenizer (tokenizer_class Qwen2Tokenizer)."""
    from transformers import Qwen2Tokenizer
    spec = json.loads(_trained_json("qwen", 480, ()))
    vocab, merges = spec["model"]["vocab"], [tuple(m) for m in spec["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, bos_token=None, unk_token=None, eos_token=IM_END,
                         pad_token=QWEN_EOT, extra_special_tokens=[QWEN_EOT, IM_START, IM_END],
                         model_max_length=32768, errors="replace", split_special_tokens=False,
                         clean_up_tokenization_spaces=False, chat_template=chat_template)
    d.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(d), save_jinja_files=save_jinja_files)
    _generation_config(d, bos_token_id=tok.convert_tokens_to_ids(QWEN_EOT),
                       pad_token_id=tok.convert_tokens_to_ids(QWEN_EOT),
                       eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(QWEN_EOT)],
                       do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    return d


def build_qwen25_chatml(d) -> Path:
    return _save_qwen(Path(d), CHATML_TEMPLATE)


def build_qwen25_config_template(d) -> Path:
    d = _save_qwen(Path(d), CHATML_TEMPLATE, save_jinja_files=False)
    assert not (d / "chat_template.jinja").exists()
    return d


def _llama3_tokenizer():
    from tokenizers import processors
    tk = _bpe("llama3", 500)
    _add(tk, L3_SPECIALS, special=True)
    bos_id = tk.token_to_id(L3_BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{L3_BOS}:0 $A:0", pair=f"{L3_BOS}:0 $A:0 {L3_BOS}:1 $B:1", special_tokens=[(L3_BOS, bos_id)])
    return tk


def _llama3_generation_config(d: Path, tk) -> None:
    _generation_config(d, bos_token_id=tk.token_to_id(L3_BOS),
                       eos_token_id=[tk.token_to_id(L3_EOS), tk.token_to_id(L3_EOT)],
                       do_sample=True, temperature=0.6, top_p=0.9)


def build_llama3(d) -> Path:
    d = Path(d)
    tk = _llama3_tokenizer()
    _save_fast(d, tk, bos_token=L3_BOS, eos_token=L3_EOT, model_max_length=131072,
               clean_up_tokenization_spaces=True, chat_template=LLAMA3_TEMPLATE,
               model_input_names=["input_ids", "attention_mask"])
    _patch_config(d, tokenizer_class="PreTrainedTokenizerFast")
    _llama3_generation_config(d, tk)
    return d


def build_llama3_json_trunc_pad(d) -> Path:
    d = Path(d)
    tk = _llama3_tokenizer()
    _save_fast(d, tk, bos_token=L3_BOS, eos_token=L3_EOT, model_max_length=131072, chat_template=LLAMA3_TEMPLATE)
    _patch_config(d, tokenizer_class="PreTrainedTokenizerFast", pad_token=None)
    spec = _read_json(d / "tokenizer.json")  # as left by a script that called enable_truncation/enable_padding
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None,
                       "pad_id": tk.token_to_id(L3_PAD), "pad_type_id": 0, "pad_token": L3_PAD}
    _write_json(d / "tokenizer.json", spec)
    _llama3_generation_config(d, tk)
    return d


def _chatml_tokenizer():
    tk = _bpe("qwen", 480)
    _add(tk, [QWEN_EOT, IM_START, IM_END], special=True)
    return tk


def build_template_list(d) -> Path:
    d = Path(d)
    _save_fast(d, _chatml_tokenizer(), eos_token=IM_END, pad_token=QWEN_EOT, save_jinja_files=False,
               chat_template={"default": CHATML_PLAIN_TEMPLATE, "tool_use": CHATML_TOOL_TEMPLATE})
    cfg = _read_json(d / "tokenizer_config.json")
    assert [t["name"] for t in cfg["chat_template"]] == ["default", "tool_use"], cfg["chat_template"]
    _patch_config(d, tokenizer_class="PreTrainedTokenizerFast", model_max_length=None)
    return d


def build_additional_templates(d) -> Path:
    d = Path(d)
    _save_fast(d, _chatml_tokenizer(), eos_token=IM_END, pad_token=QWEN_EOT, model_max_length=4096,
               chat_template={"default": CHATML_TEMPLATE, "tool_use": CHATML_TOOL_TEMPLATE})
    assert (d / "chat_template.jinja").exists() and (d / "additional_chat_templates" / "tool_use.jinja").exists()
    _patch_config(d, chat_template=STALE_TEMPLATE)  # .jinja files take priority over this
    return d


def build_chat_template_json(d) -> Path:
    d = Path(d)
    _save_fast(d, _chatml_tokenizer(), eos_token=IM_END, pad_token=QWEN_EOT, model_max_length=32768,
               chat_template=CHATML_PLAIN_TEMPLATE, save_jinja_files=False)
    _write_json(d / "chat_template.json", {"chat_template": PROCESSOR_TEMPLATE})
    return d


def build_whitespace_template(d) -> Path:
    d = Path(d)
    tk = _bpe("llama3", 500, ("<unk>", "<s>", "</s>"))
    _add(tk, ["<|system|>", "<|user|>", "<|assistant|>"], special=True)
    _save_fast(d, tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
               model_max_length=2048, chat_template=WHITESPACE_TEMPLATE)
    _generation_config(d, bos_token_id=tk.token_to_id("<s>"), eos_token_id=tk.token_to_id("</s>"))
    return d


# directories that are not valid layouts, for the error tests

def build_no_template(d) -> Path:
    """A llama3-like tokenizer without any chat template (transformers' apply_chat_template raises)."""
    d = Path(d)
    _save_fast(d, _llama3_tokenizer(), bos_token=L3_BOS, eos_token=L3_EOT)
    assert not (d / "chat_template.jinja").exists() and "chat_template" not in _read_json(d / "tokenizer_config.json")
    return d


def build_without_tokenizer_json(d) -> Path:
    """tokenizer_config.json and a chat template, but no tokenizer.json (e.g. a half-copied checkpoint)."""
    d = build_llama3(d)
    (d / "tokenizer.json").unlink()
    return d


LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "nanoseek": build_nanoseek,
    "deepseek_r1": build_deepseek_r1,
    "r1_distill_qwen": build_r1_distill_qwen,
    "qwen25_chatml": build_qwen25_chatml,
    "qwen25_config_template": build_qwen25_config_template,
    "llama3": build_llama3,
    "llama3_json_trunc_pad": build_llama3_json_trunc_pad,
    "template_list": build_template_list,
    "additional_templates": build_additional_templates,
    "chat_template_json": build_chat_template_json,
    "whitespace_template": build_whitespace_template,
}


def build_all(tmp_dir) -> dict[str, Path]:
    tmp = Path(tmp_dir)
    return {name: build(tmp / name) for name, build in LAYOUTS.items()}
