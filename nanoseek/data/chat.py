"""The DeepSeek-R1 chat format: template, renderer, completion parser, R1-Zero prompt.

A conversation renders as

    <bos>{system}<｜User｜>{q1}<｜Assistant｜>{a1}<eos><｜User｜>{q2}<｜Assistant｜><think>\n{r2}\n</think>\n\n{a2}<eos>

Only the last assistant turn keeps its reasoning: R1 drops earlier chains of thought from the
history, so a multi-turn context does not fill up with old thinking. The generation prompt
ends with `<｜Assistant｜><think>\n`, i.e. the template itself opens the think block, and the
model's completion is `{reasoning}\n</think>\n\n{answer}<eos>`. Rendering a conversation
without its last assistant turn plus the generation prompt therefore gives an exact prefix
of the full rendering, which is what SFT masking relies on.

The same Jinja string is saved as chat_template.jinja, so transformers' apply_chat_template
renders the identical text (tests/test_chat.py and tests/test_tokenizer.py check this).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

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
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] or '' %}"
    # a model output pasted back into history may still hold its thinking: keep the answer
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{ '<｜Assistant｜>' }}"
    "{%- if loop.last %}"
    "{{ '<think>\\n' + (message.get('reasoning_content') or '').strip() + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{ content + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


@lru_cache(maxsize=8)
def _compiled(template: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    # the same environment options transformers uses, so both render identically
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    return env.from_string(template)


def render_chat(messages: list[dict], add_generation_prompt: bool = False, template: str = CHAT_TEMPLATE,
                bos_token: str = BOS, eos_token: str = EOS) -> str:
    """Render a conversation to text exactly as transformers' apply_chat_template(tokenize=False) does."""
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {m.get('role')!r}; expected system, user or assistant")
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      bos_token=bos_token, eos_token=eos_token)


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


def parse_completion(text: str, opened_think: bool = True) -> Parsed:
    """Split a completion into (reasoning, answer).

    opened_think=True: the prompt ended with the template's `<think>\\n`, so the completion is
    `reasoning </think> answer`; a repeated `<think>` at its start is tolerated (parsed away) but
    makes it not well formed. opened_think=False: the completion must open the block itself.
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
    if THINK_END not in body:
        reasoning = body.replace(THINK_START, "").strip()
        return Parsed(reasoning=reasoning if (opened_think or not problems) else None, answer="",
                      well_formed=False, reason="; ".join(problems + ["no </think>"]))
    reasoning, answer = body.split(THINK_END, 1)
    if THINK_START in reasoning:
        problems.append("nested <think> in reasoning")
    if THINK_START in answer or THINK_END in answer:
        problems.append("think tags after </think>")
    reasoning, answer = reasoning.strip(), answer.strip()
    tagged = _ANSWER_TAG.findall(answer)
    if tagged:
        answer = tagged[-1].strip()
    if not reasoning:
        problems.append("empty reasoning")
    if not answer:
        problems.append("empty answer")
    return Parsed(reasoning=reasoning, answer=answer, well_formed=not problems, reason="; ".join(problems))


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
