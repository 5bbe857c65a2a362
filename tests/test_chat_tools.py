"""Tool turns in nanoseek's chat template: transformers renders them the same (text and ids), SFT's prompt /
completion split holds for a tool-calling conversation, the markers are single special tokens of a new
tokenizer, and a tokenizer trained before they existed still renders, encodes and parses tool calls (as text)."""
import json

import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from nanoseek.data.tool_calls import CALLS_BEGIN, TOOL_MARKERS, ToolCall, ToolCallParser, format_calls
from nanoseek.infer.api_schema import FunctionSpec
from nanoseek.infer.structured_output import JSONGrammars
from nanoseek.infer.tools import ToolUse, call_grammar
from nanoseek.tokenizer import SPECIAL_TOKENS, TAG_TOKENS, Tokenizer, train_tokenizer

TEXTS = ["What is 2 + 3? The calculator says 5.", "Sort 5, 3, 9 <think>\nsmallest is 3\n</think>\n\n3, 5, 9"] * 40
CALCULATOR = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "arithmetic", "parameters": CALCULATOR}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}
CONVERSATION = [
    {"role": "system", "content": "You are a careful solver."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "assistant", "reasoning_content": "it said 5", "content": "5"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


def test_markers_are_special_tokens_after_the_tags(tok):
    ids = [tok.token_to_id(m) for m in TOOL_MARKERS]
    assert ids == list(range(9, 18))
    text = format_calls([ToolCall("f", "{}")])
    assert tok.decode(tok.encode(text)) == text and CALLS_BEGIN not in tok.decode(tok.encode(text), True)


@pytest.mark.parametrize("messages,gen", [(CONVERSATION, False), (CONVERSATION[:4], True), (CONVERSATION[:2], True)])
def test_transformers_renders_tool_turns_the_same(tok, tmp_path, messages, gen):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen, tools=TOOLS)
    assert ours == hf.apply_chat_template(messages, add_generation_prompt=gen, tools=TOOLS, tokenize=False)
    ids = hf.apply_chat_template(messages, add_generation_prompt=gen, tools=TOOLS, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == tok.encode(ours)
    assert json.dumps(TOOLS[0]["function"], ensure_ascii=False) in ours


def test_sft_split_of_a_tool_conversation(tok):
    """The prompt of the answer after the tool's output is the exact prefix of the whole, and both hold the
    reasoning that chose the call (it belongs to the same turn). SFT trains the call and the answer, not the
    tool's output."""
    ids, mask = tok.encode_chat(CONVERSATION)
    prompt = tok.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True)
    first = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    assert ids[:mask.index(1)] == tok.encode(first) and tok.decode(ids).startswith(prompt)
    assert "use the tool" in prompt and tok.decode(ids) == tok.apply_chat_template(CONVERSATION)
    call = format_calls([ToolCall("calculator", CALL["function"]["arguments"])])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == (
        "use the tool\n</think>\n\n" + call + tok.eos_token + "it said 5\n</think>\n\n5" + tok.eos_token)
    call_turn = tok.apply_chat_template(CONVERSATION[:3])
    assert call_turn.endswith("<think>\nuse the tool\n</think>\n\n" + call + tok.eos_token)


def old_tokenizer() -> Tokenizer:
    """nanoseek's BPE as trained before the tool markers were tokens."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainer=trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + TAG_TOKENS]))
    return Tokenizer(tk)


def test_a_tokenizer_without_the_markers_still_renders_and_parses_tool_calls():
    tok = old_tokenizer()
    assert all(tok.token_to_id(m) is None for m in TOOL_MARKERS)
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    answer = "<think>\nr\n</think>\n\n" + format_calls([ToolCall("calculator", '{"expression": "2+3"}')])
    parser, calls, sent = ToolCallParser(), [], ""
    ids = tok.encode(answer.split("</think>\n\n")[1])
    for k in range(1, len(ids) + 1):  # as a server streams: markers come in byte pieces, whole characters only
        text = tok.decode(ids[:k])
        if not text.endswith("\ufffd"):
            calls += parser.feed(text[len(sent):])[1]
            sent = text
    calls += parser.feed("", final=True)[1]
    assert calls[0].name == "calculator" and "".join(c.arguments for c in calls) == '{"expression": "2+3"}'
    grammar = call_grammar(ToolUse(forced=[FunctionSpec.model_validate(TOOLS[0]["function"])]), tok)
    assert json.dumps(CALLS_BEGIN) in grammar  # the marker as text, not as a token id
    JSONGrammars(tok, tok.vocab_size, frozenset(tok.stop_ids)).lark_grammar(grammar, "tool_choice", "tool_choice")
