"""Chat formats: nanoseek's R1 template, any model's template rendered as transformers renders it, how a
question is asked (r1 / r1-zero), and the split of a completion (whole or streamed) into reasoning and answer.

nanoseek's own template (the one its tokenizer ships):

A conversation renders as

    <bos>{system}<｜User｜>{q1}<｜Assistant｜>{a1}<eos><｜User｜>{q2}<｜Assistant｜><think>\n{r2}\n</think>\n\n{a2}<eos>

Only the last assistant turn keeps its reasoning: R1 drops earlier chains of thought from the
history, so a multi-turn context does not fill up with old thinking. Tool turns (DeepSeek-V3's markers,
nanoseek/data/tool_calls.py) render as (line breaks for reading only)

    <bos>[## Tools\n{function as JSON}\n...\n]...<｜User｜>{q}<｜Assistant｜><think>\n{r}\n</think>\n\n{content}
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{arguments}\n```
    <｜tool▁call▁end｜><｜tool▁calls▁end｜><eos><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{result}
    <｜tool▁output▁end｜><｜tool▁outputs▁end｜><｜Assistant｜><think>\n...

Every assistant turn after the last user message (the calls and the answer that follow one question) keeps
its reasoning, as DeepSeek's API wants it within a tool-calling turn: the model goes on with the chain of
thought that chose the call, and the rendering of an unfinished tool turn stays a prefix of the finished one.
Unlike DeepSeek-V3's own template, the turn after the tools' outputs opens with `<｜Assistant｜>` like every
other, so the generation prompt is the same everywhere. The generation prompt
ends with `<｜Assistant｜><think>\n`, i.e. the template itself opens the think block, and the
model's completion is `{reasoning}\n</think>\n\n{answer}<eos>`. Rendering a conversation
without its last assistant turn plus the generation prompt therefore gives an exact prefix
of the full rendering, which is what SFT masking relies on.

The same Jinja string is saved as chat_template.jinja, so transformers' apply_chat_template
renders the identical text (tests/test_chat.py and tests/test_tokenizer.py check this).

Other models bring their own template (DeepSeek-R1's drops the reasoning of every assistant turn, ChatML
has no think block at all): `render_chat` runs any of them in transformers' Jinja environment, and the
parsers work on text, so `<think>` may be one token, several, or something the model never writes.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanoseek.errors import UsageError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"

# Written as one line of Jinja without literal newlines so that the renderer's whitespace
# options (transformers uses trim_blocks + lstrip_blocks) cannot change the output.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- if tools %}{{ '## Tools\\n' }}"
    "{%- for tool in tools %}{{ (tool['function'] or tool) | tojson }}{{ '\\n' }}{%- endfor %}{{ '\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] or '' %}"
    # a model output pasted back into history may still hold its thinking: keep the answer
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{ '<｜Assistant｜>' }}"
    # the last turn keeps its reasoning, and so does every turn of the tool calls answering the last question
    "{%- if loop.last or loop.index0 > ns.last_user %}"
    "{{ '<think>\\n' + (message.get('reasoning_content') or '').strip() + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{ content }}"
    "{%- if message['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in message['tool_calls'] %}{{ '\\n' if not loop.first }}"
    "{{ '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + call['function']['name'] + '\\n```json\\n' }}"
    "{{ call['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}"
    "{%- endfor %}{{ '<｜tool▁calls▁end｜>' }}{%- endif %}"
    "{{ eos_token }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' %}{{ '<｜tool▁outputs▁begin｜>' }}{%- endif %}"
    "{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{ '<｜tool▁outputs▁end｜>' }}{%- endif %}"
    "{%- else %}{{ raise_exception('unknown role ' + message['role'] + ': expected system, user, assistant or tool') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


class ChatTemplateError(UsageError):
    """A chat template refused a conversation (its raise_exception), or failed to render it."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant tokens with it; it renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compiled(template: str):
    """The Jinja environment transformers renders chat templates in: sandboxed, trim_blocks + lstrip_blocks,
    loop controls, `{% generation %}`, and the globals/filters Hub templates use (raise_exception,
    strftime_now, tojson without HTML escaping)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message})") from e


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize(messages: list[dict]) -> list[dict]:
    """As transformers hands messages to a template: keys whose value is None dropped, and a message's
    reasoning given under all the names templates read it by."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ChatTemplateError(f"a chat message must be a mapping with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat(messages: list[dict], add_generation_prompt: bool = False, template: str = CHAT_TEMPLATE,
                bos_token: str | None = BOS, eos_token: str | None = EOS, **kwargs) -> str:
    """Render a conversation to text exactly as transformers' apply_chat_template(tokenize=False) does.
    kwargs reach the template as variables (the other special tokens, `tools`, template switches)."""
    if not messages:
        raise ChatTemplateError("cannot render an empty conversation")
    values = {"bos_token": bos_token, "eos_token": eos_token, **kwargs}
    try:
        return _compiled(template).render(messages=_normalize(messages), add_generation_prompt=add_generation_prompt,
                                          **{k: v for k, v in values.items() if v is not None})
    except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined names, sandbox violations
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from e


def opens_think(prompt: str) -> bool:
    """Does this prompt end inside an opened think block (R1's generation prompt, the R1-Zero prompt)?
    Then the completion is `reasoning</think>answer`; otherwise it may open the block itself, or not think."""
    return prompt.rstrip().endswith(THINK_START)


# --------------------------------------------------------------------------------------------
# parsing model outputs

@dataclass
class Parsed:
    reasoning: str | None  # text of the think block (None when there is no think block at all)
    answer: str            # text after </think> ("" when the block never closed)
    well_formed: bool      # exactly one think block, non-empty reasoning, non-empty answer
    reason: str = ""       # why it is not well formed


_END_MARKERS = (EOS, PAD)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def _unwrap_answer(answer: str) -> str:
    tagged = _ANSWER_TAG.findall(answer)
    return tagged[-1].strip() if tagged else answer


def parse_completion(text: str, opened_think: bool = True) -> Parsed:
    """Split a completion into (reasoning, answer).

    opened_think=True: the prompt ended with the template's `<think>\\n`, so the completion is
    `reasoning </think> answer`; a repeated `<think>` at its start is tolerated (parsed away) but
    makes it not well formed. opened_think=False: the completion must open the block itself; one with no
    think tags at all is taken as a plain answer (reasoning None, not well formed: a model that does not think).
    Anything after an end-of-sentence token is ignored; whitespace around parts is ignored.
    An `<answer>…</answer>` pair in the answer part (R1-Zero style) is unwrapped.
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    for marker in _END_MARKERS:  # generation stops at eos; trailing pad / junk is not part of it
        if marker in text:
            text = text.split(marker, 1)[0]
    problems = []
    body = text.lstrip()
    if body.startswith(THINK_START):
        body = body[len(THINK_START):]
        if opened_think:
            problems.append("repeated <think>")
    elif not opened_think:
        problems.append("no opening <think>")
    if not opened_think and THINK_START not in text and THINK_END not in text:
        # a model that does not think (a chat template without a think block): all of it is the answer
        return Parsed(reasoning=None, answer=_unwrap_answer(body.strip()), well_formed=False, reason="no think block")
    if THINK_END not in body:
        reasoning = body.replace(THINK_START, "").strip()
        return Parsed(reasoning=reasoning if (opened_think or not problems) else None, answer="",
                      well_formed=False, reason="; ".join(problems + ["no </think>"]))
    reasoning, answer = body.split(THINK_END, 1)
    if THINK_START in reasoning:
        problems.append("nested <think> in reasoning")
    if THINK_START in answer or THINK_END in answer:
        problems.append("think tags after </think>")
    reasoning, answer = reasoning.strip(), _unwrap_answer(answer.strip())
    if not reasoning:
        problems.append("empty reasoning")
    if not answer:
        problems.append("empty answer")
    return Parsed(reasoning=reasoning, answer=answer, well_formed=not problems, reason="; ".join(problems))


class ThinkSplitter:
    """Splits streamed completion text at `</think>` into (reasoning, answer) deltas. opened: the generation
    prompt already opened <think> (R1's template). Otherwise the completion may open it as its first text, or
    not think at all (then it is all answer). Holds back a tail that may be the start of a tag; drops blanks
    after it. Works on text, so the tags may be single tokens, several, or unknown to the vocabulary."""

    def __init__(self, opened: bool = True):
        self.thinking, self.buf, self.started = True, "", False
        self.undecided = not opened  # not opened: is the first text "<think>"?

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        if self.undecided:
            head = self.buf.lstrip()
            if THINK_START.startswith(head) and head != THINK_START and not final:
                return "", ""  # nothing yet, or a prefix of "<think>": wait
            self.undecided, self.thinking = False, head.startswith(THINK_START)
            self.buf = head[len(THINK_START):] if self.thinking else self.buf
        reasoning = ""
        if self.thinking:
            i = self.buf.find(THINK_END)
            if i < 0:
                keep = 0 if final else next((k for k in range(len(THINK_END) - 1, 0, -1)
                                             if self.buf.endswith(THINK_END[:k])), 0)
                cut = len(self.buf) - keep
                reasoning, self.buf = self.buf[:cut], self.buf[cut:]
                return reasoning, ""
            reasoning, self.buf, self.thinking = self.buf[:i], self.buf[i + len(THINK_END):], False
        if not self.started:
            self.buf = self.buf.lstrip()  # the template's "\n\n" after </think>
            self.started = bool(self.buf)
        content, self.buf = self.buf, ""
        return reasoning, content


# --------------------------------------------------------------------------------------------
# R1-Zero: a plain-text prompt for RL straight on a base model (no chat template)

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant "
    "solves it. The Assistant first thinks the problem through step by step, then gives the "
    "answer. The thinking goes inside <think> </think> and the answer inside <answer> </answer>, "
    "like this: <think> thinking here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>"
)


def format_r1_zero_prompt(question: str) -> str:
    """R1-Zero style prompt. It ends with an opened <think>, so parse with opened_think=True."""
    return R1_ZERO_TEMPLATE.format(question=question.strip())


# --------------------------------------------------------------------------------------------
# how a question is asked

PROMPT_TEMPLATES = ("r1", "r1-zero")


def question_prompt(tok, question: str, template: str = "r1") -> str:
    """The text a task question is asked with. r1: the model's own chat template, one user turn plus its
    generation prompt (nanoseek's and DeepSeek-R1's open `<think>` there; ChatML's does not). r1-zero: the
    R1-Zero plain prompt after bos, for base models (no chat template needed). tok None: nanoseek's format."""
    if template == "r1":
        messages = [{"role": "user", "content": question}]
        return render_chat(messages, True) if tok is None else tok.apply_chat_template(messages, add_generation_prompt=True)
    if template == "r1-zero":
        return (BOS if tok is None else tok.bos_token or "") + format_r1_zero_prompt(question)
    raise UsageError(f"unknown prompt template {template!r}: choose one of {', '.join(PROMPT_TEMPLATES)}")


def describe_template(tok, template: str = "r1") -> str:
    """One line for a command's start: which prompt template, and how its completions will be split."""
    example = question_prompt(tok, "QUESTION", template)
    tail = example[example.index("QUESTION") + len("QUESTION"):] if "QUESTION" in example else example[-40:]
    what = "the model's chat template" if template == "r1" else "R1-Zero's plain prompt"
    how = ("it opens <think>: completions are reasoning</think>answer" if opens_think(example) else
           "it does not open <think>: a completion may think in <think>...</think>; without one, all of it is the answer")
    return f"prompt template {template} ({what}; the prompt ends {tail!r}): {how}"


def prompt_opens_think(tok, template: str = "r1") -> bool:
    """Does `template` with this tokenizer leave its prompts inside an opened think block?"""
    return opens_think(question_prompt(tok, "?", template))
