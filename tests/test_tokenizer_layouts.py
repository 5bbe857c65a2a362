"""nanoseek's tokenizer must load any HF tokenizer directory the way transformers does.

For every layout in tests/tokenizer_layouts.py (nanoseek's own, DeepSeek-R1, R1-Distill-Qwen, Qwen2.5
ChatML, Llama 3 and template-storage variants), `nanoseek.tokenizer.load_tokenizer(d)` must render
chats to the same text and the same ids as `transformers.AutoTokenizer.from_pretrained(d)
.apply_chat_template(...)`, encode and decode plain text the same way, and expose the special ids,
stop ids, model_max_length and think_end_id the directory defines.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

transformers = pytest.importorskip("transformers")

import tokenizer_layouts as layouts  # noqa: E402  (pytest puts tests/ on sys.path: it has no __init__.py)
from nanoseek.errors import UsageError  # noqa: E402
from nanoseek.tokenizer import load_tokenizer  # noqa: E402

NAMES = list(layouts.LAYOUTS)

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is 2 + 3?"}],
    "system_user": [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "Sort in ascending order: 5, 3, 9"},
    ],
    "multi_turn": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5", "reasoning_content": None},  # None keys are dropped
        {"role": "user", "content": "And 5 * 4?"},
    ],
    "think_in_content": [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 plus 3 is 5\n</think>\n\nThe answer is 5."},
        {"role": "user", "content": "Now 5 * 4?"},
    ],
    "reasoning_field": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3\nis 5"},
        {"role": "user", "content": "And 5 * 4?"},
        {"role": "assistant", "content": "20", "reasoning_content": "5 times 4 is 20"},
    ],
    "unicode": [
        {"role": "system", "content": "당신은 친절한 도우미입니다 🤖"},
        {"role": "user", "content": "안녕하세요! 2+2는? 😀🚀 中文 café naïve a < b & c's"},
        {"role": "assistant", "content": "4입니다 ✅"},
        {"role": "user", "content": "감사합니다 👍🏽 👩‍👩‍👧 \"quoted\" \\ back"},
    ],
}

PLAIN_TEXTS = [
    "",
    "Hello, world!",
    "What is 123 + 4567? The answer is 4690.",
    "안녕하세요 😀🚀 中文 café naïve 👩‍👩‍👧",
    "Hello , world . it 's , isn't ?",  # clean_up_tokenization_spaces would change this on decode
    "  leading and trailing spaces  \n\n\ttab",
    "<think>\nreasoning here\n</think>\n\n42",
    "x<think>y</think>z",
    "a < b & c's {{ not jinja }} {% neither %}",
    "the quick brown fox jumps over the lazy dog because the answer is 1234567 " * 3,  # > 8 tokens
]


# --------------------------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return layouts.build_all(tmp_path_factory.mktemp("layouts"))


_HF: dict[str, object] = {}
_OURS: dict[str, object] = {}


def hf_tok(dirs, name):
    key = str(dirs[name])
    if key not in _HF:
        _HF[key] = transformers.AutoTokenizer.from_pretrained(key)
    return _HF[key]


def ours_tok(dirs, name):
    """nanoseek's tokenizer for a layout (a load error is raised again in every test that needs it)."""
    key = str(dirs[name])
    if key not in _OURS:
        _OURS[key] = load_tokenizer(dirs[name])
    return _OURS[key]


def hf_ids(out) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True), 4.x a list."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def texts_for(hf) -> list[str]:
    added = list(hf.added_tokens_encoder)
    return PLAIN_TEXTS + [
        "".join(added),
        " ".join(f"a{t}b" for t in added),
        "\n".join(hf.all_special_tokens) + "\nend",
    ]


def tokenizer_config(d: Path) -> dict:
    return json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))


def generation_eos_ids(d: Path) -> list[int]:
    path = d / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


# --------------------------------------------------------------------------------------------
# the fixtures themselves (independent of nanoseek's tokenizer)

def test_layouts_build_quickly_and_load_in_transformers(tmp_path):
    t0 = time.perf_counter()
    built = layouts.build_all(tmp_path)
    assert time.perf_counter() - t0 < 5, "the layout builders should take well under a few seconds"
    assert set(built) == set(layouts.LAYOUTS) and all((p / "tokenizer.json").exists() for p in built.values())
    for name, d in built.items():
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        text = hf.apply_chat_template(CONVERSATIONS["system_user"], add_generation_prompt=True, tokenize=False)
        assert "Sort in ascending order" in text, name
    # what each layout is meant to exercise
    assert (built["qwen25_chatml"] / "chat_template.jinja").exists()
    assert isinstance(tokenizer_config(built["qwen25_config_template"])["chat_template"], str)
    assert isinstance(tokenizer_config(built["template_list"])["chat_template"], list)
    assert (built["additional_templates"] / "additional_chat_templates" / "tool_use.jinja").exists()
    assert (built["chat_template_json"] / "chat_template.json").exists()
    ds = tokenizer_config(built["deepseek_r1"])
    assert ds["bos_token"]["__type"] == "AddedToken" and "added_tokens_decoder" in ds
    hf = transformers.AutoTokenizer.from_pretrained(str(built["deepseek_r1"]))  # AddedToken dicts still load
    assert (str(hf.bos_token), hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (layouts.DS_BOS, 0, 1, 2)
    assert generation_eos_ids(built["r1_distill_qwen"]) and len(generation_eos_ids(built["r1_distill_qwen"])) == 2
    assert json.loads((built["llama3_json_trunc_pad"] / "tokenizer.json").read_text())["truncation"]["max_length"] == 8


# --------------------------------------------------------------------------------------------
# chat template parity

@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", NAMES)
def test_chat_text_matches_transformers(dirs, name, conv, gen):
    messages = copy.deepcopy(CONVERSATIONS[conv])
    theirs = hf_tok(dirs, name).apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    ours = ours_tok(dirs, name).apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert isinstance(ours, str)
    assert ours == theirs
    assert messages == CONVERSATIONS[conv], "apply_chat_template must not modify the caller's messages"


@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", NAMES)
def test_chat_ids_match_transformers(dirs, name, conv, gen):
    messages = CONVERSATIONS[conv]
    theirs = hf_ids(hf_tok(dirs, name).apply_chat_template(messages, add_generation_prompt=gen, tokenize=True))
    ours = ours_tok(dirs, name).apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    assert [int(i) for i in ours] == theirs


def test_bad_role_raises_value_error_with_template_message(dirs):
    messages = [{"role": "user", "content": "hi"}, {"role": "narrator", "content": "meanwhile"}]
    with pytest.raises(Exception, match="got narrator"):  # transformers raises jinja2's TemplateError
        hf_tok(dirs, "llama3").apply_chat_template(messages, tokenize=False)
    tok = ours_tok(dirs, "llama3")
    for tokenize in (False, True):
        with pytest.raises(ValueError) as info:
            tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize)
        assert layouts.LLAMA3_BAD_ROLE_MESSAGE + "narrator" in str(info.value)


# --------------------------------------------------------------------------------------------
# plain encode / decode parity

@pytest.mark.parametrize("name", NAMES)
def test_encode_matches_transformers(dirs, name):
    hf, tok = hf_tok(dirs, name), ours_tok(dirs, name)
    for text in texts_for(hf):
        assert [int(i) for i in tok.encode(text)] == hf(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_transformers(dirs, name):
    hf, tok = hf_tok(dirs, name), ours_tok(dirs, name)
    seqs = [hf(text, add_special_tokens=False)["input_ids"] for text in texts_for(hf)]
    seqs += [hf_ids(hf.apply_chat_template(c, add_generation_prompt=True, tokenize=True)) for c in CONVERSATIONS.values()]
    for ids in seqs:
        assert tok.decode(ids) == hf.decode(ids), ids
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), ids


# --------------------------------------------------------------------------------------------
# ids and limits the directory defines

@pytest.mark.parametrize("name", NAMES)
def test_special_ids(dirs, name):
    hf, tok = hf_tok(dirs, name), ours_tok(dirs, name)
    assert tok.bos_id == hf.bos_token_id
    assert tok.eos_id == hf.eos_token_id is not None
    # pad falls back to eos when the layout has none
    assert tok.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)


@pytest.mark.parametrize("name", NAMES)
def test_stop_ids(dirs, name):
    tok = ours_tok(dirs, name)
    stop = tok.stop_ids
    assert isinstance(stop, list) and all(isinstance(i, int) for i in stop)
    assert tok.eos_id in stop
    assert set(generation_eos_ids(dirs[name])) <= set(stop)


def test_stop_ids_examples(dirs):
    """The generation_config shapes spelled out: an int (deepseek_r1), a list of two (r1_distill_qwen, llama3)."""
    hf = hf_tok(dirs, "r1_distill_qwen")
    assert set(ours_tok(dirs, "r1_distill_qwen").stop_ids) >= {
        hf.convert_tokens_to_ids(layouts.DS_EOS), hf.convert_tokens_to_ids(layouts.QWEN_EOT)}
    hf = hf_tok(dirs, "llama3")
    assert set(ours_tok(dirs, "llama3").stop_ids) >= {
        hf.convert_tokens_to_ids(layouts.L3_EOT), hf.convert_tokens_to_ids(layouts.L3_EOS)}
    hf = hf_tok(dirs, "qwen25_chatml")
    assert set(ours_tok(dirs, "qwen25_chatml").stop_ids) >= {
        hf.convert_tokens_to_ids(layouts.IM_END), hf.convert_tokens_to_ids(layouts.QWEN_EOT)}
    assert 1 in ours_tok(dirs, "deepseek_r1").stop_ids


@pytest.mark.parametrize("name", [n for n in NAMES if n != "template_list"])
def test_model_max_length(dirs, name):
    cfg = tokenizer_config(dirs[name])
    assert "model_max_length" in cfg
    assert ours_tok(dirs, name).model_max_length == cfg["model_max_length"] == hf_tok(dirs, name).model_max_length


@pytest.mark.parametrize("name", NAMES)
def test_think_end_id(dirs, name):
    ids = hf_tok(dirs, name).encode(layouts.THINK_END, add_special_tokens=False)
    expected = ids[0] if len(ids) == 1 else None
    assert ours_tok(dirs, name).think_end_id == expected


def test_think_end_id_examples(dirs):
    assert ours_tok(dirs, "nanoseek").think_end_id == 6
    assert ours_tok(dirs, "deepseek_r1").think_end_id == hf_tok(dirs, "deepseek_r1").convert_tokens_to_ids("</think>")
    assert ours_tok(dirs, "qwen25_chatml").think_end_id is None  # </think> is several ordinary tokens there
    assert ours_tok(dirs, "llama3").think_end_id is None


# --------------------------------------------------------------------------------------------
# directories nanoseek must refuse clearly

def test_missing_tokenizer_json_is_usage_error(tmp_path):
    d = layouts.build_without_tokenizer_json(tmp_path / "half_copied")
    with pytest.raises(UsageError) as info:
        load_tokenizer(d)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert str(d) in msg and "tokenizer.json" in msg


def test_missing_directory_is_usage_error(tmp_path):
    d = tmp_path / "no_such_model"
    with pytest.raises(UsageError) as info:
        load_tokenizer(d)
    assert str(d) in str(info.value)


def test_no_chat_template_is_value_error(tmp_path):
    """transformers raises ValueError when a directory has no template; nanoseek must not silently
    render with a template of its own (at load or at apply_chat_template, either is fine)."""
    d = layouts.build_no_template(tmp_path / "no_template")
    with pytest.raises(ValueError):
        transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
            CONVERSATIONS["user_only"], tokenize=False)
    with pytest.raises(ValueError):
        load_tokenizer(d).apply_chat_template(CONVERSATIONS["user_only"], add_generation_prompt=True)


# --------------------------------------------------------------------------------------------
# random conversations

_PIECES = st.sampled_from([
    "<think>", "</think>", "\n", "\n\n", " ", "  ", "😀", "👩‍👩‍👧", "한국어", "中文", "café", "{{ x }}", "{% if %}",
    "<|im_end|>", "<|im_start|>", layouts.DS_USER, layouts.DS_EOS, "'", '"', "\\", "\t", "123", "<", "&",
])
_TEXT = st.lists(
    st.one_of(st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=12), _PIECES), max_size=6,
).map("".join)


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_TEXT)})
    for _ in range(draw(st.integers(0, 2))):
        messages.append({"role": "user", "content": draw(_TEXT)})
        messages.append({"role": "assistant", "content": draw(_TEXT)})
    messages.append({"role": "user", "content": draw(_TEXT)})
    return messages


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen25_chatml"])
def test_random_conversations_match_transformers(dirs, name):
    hf, tok = hf_tok(dirs, name), ours_tok(dirs, name)

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(conversations(), st.booleans())
    def check(messages, gen):
        theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == theirs
        theirs_ids = hf_ids(hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True))
        assert [int(i) for i in tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)] == theirs_ids

    check()
