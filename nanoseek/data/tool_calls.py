"""DeepSeek-V3's tool-call format, and the parser that reads tool calls out of a completion, whole or streamed.

A completion that calls tools ends with one block of calls, each the function's name and its JSON arguments
in a fenced block, as DeepSeek-V3's chat template writes them (calls joined by "\\n"; the other line breaks
below are for reading only):

    {content}<｜tool▁calls▁begin｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\\n```json\\n{arguments}\\n```<｜tool▁call▁end｜>\\n
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

and the tools' results go back to the model as

    <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{result}<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>

The markers are single tokens in DeepSeek's vocabulary and in nanoseek's own (tokenizer.FIXED_TOKENS); in any
other vocabulary they are plain text, which is why the parser works on text.

`ToolCallParser` is a streaming state machine: fed the completion in pieces of any size (a marker split over
several pieces, or several markers in one), it returns the content and the call deltas that are certain so
far, holding back only a tail that may still become a marker or the arguments' closing fence. Whatever the
cuts, the content and calls it yields add up to what `parse_tool_calls` gives for the whole string (the
property tests/test_tool_calls.py checks). Malformed pieces are handled the same way in both: text inside a
block that is not a call is dropped, a call whose header has no name is dropped, and a call cut off by the
end of the completion keeps the arguments it got.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
OUTPUTS_END = "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"
TOOL_MARKERS = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN,
                OUTPUT_END]
ARGS_OPEN = "```json\n"  # after the newline that ends the call's header
ARGS_CLOSE = "\n```"

# what may end the arguments, and what the parser strips there: whitespace and the closing fence (complete,
# once the call has ended; while streaming, any partial fence is held back as it may still complete)
_CLOSING = re.compile(r"\s*(?:```)?\s*\Z")
_MAYBE_CLOSING = re.compile(r"\s*(?:`{1,3}\s*)?\Z")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass
class CallDelta:
    index: int         # the call's position among this completion's calls
    name: str | None   # set in the call's first delta only
    arguments: str     # the next piece of the arguments' text


def format_call(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n{ARGS_OPEN}{arguments}{ARGS_CLOSE}{CALL_END}"


def format_calls(calls: list[ToolCall]) -> str:
    """The block of calls a completion ends with (before its end-of-sentence token)."""
    return CALLS_BEGIN + "\n".join(format_call(c.name, c.arguments) for c in calls) + CALLS_END


def _partial(buf: str, markers: tuple[str, ...]) -> int:
    """The length of the longest tail of buf that is a proper prefix of one of the markers."""
    for k in range(min(len(buf), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(buf[-k:]) and len(m) > k for m in markers):
            return k
    return 0


def _first(buf: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """The earliest of the markers in buf: (position, marker), or (-1, None)."""
    found = [(i, m) for m in markers if (i := buf.find(m)) >= 0]
    return min(found) if found else (-1, None)


class ToolCallParser:
    """Feed the answer text (after the reasoning) piece by piece; get (content, call deltas) back.

    States: text (content, until a block opens), block (between calls), header (`function<sep>NAME` up to a
    newline), args (the arguments, until the call ends). `final=True` on the last piece flushes what was held.
    """

    def __init__(self):
        self.state, self.buf = "text", ""
        self.calls = 0        # calls started so far (the next call's index)
        self.sent = 0         # characters of the current call's arguments already returned
        self.args_started = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        self.buf += text
        content, deltas = [], []
        while self._step(final, content, deltas):
            pass
        return "".join(content), _merged(deltas)

    def _step(self, final: bool, content: list[str], deltas: list[CallDelta]) -> bool:
        """Advance over the buffer; False when nothing more can be decided until more text comes."""
        if self.state == "text":
            i = self.buf.find(CALLS_BEGIN)
            if i < 0:
                keep = 0 if final else _partial(self.buf, (CALLS_BEGIN,))
                content.append(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return False
            content.append(self.buf[:i])
            self.buf, self.state = self.buf[i + len(CALLS_BEGIN):], "block"
            return True
        if self.state == "block":  # only a call or the block's end counts here: what lies between is dropped
            i, marker = _first(self.buf, (CALL_BEGIN, CALLS_END))
            if marker is None:
                self.buf = "" if final else self.buf[len(self.buf) - _partial(self.buf, (CALL_BEGIN, CALLS_END)):]
                return False
            self.buf = self.buf[i + len(marker):]
            self.state = "header" if marker == CALL_BEGIN else "text"
            return True
        if self.state == "header":
            i, marker = _first(self.buf, ("\n", CALL_END, CALLS_END))
            if marker is None:
                if final:
                    self.buf = ""
                return False
            header, self.buf = self.buf[:i], self.buf[i:]
            name = header.split(SEP, 1)[1].strip() if SEP in header else ""
            if marker != "\n" or not name:  # a call without a name or without arguments: not a call
                self.state = "block"
                return True
            self.buf = self.buf[1:]
            deltas.append(CallDelta(self.calls, name, ""))
            self.calls, self.sent, self.args_started, self.state = self.calls + 1, 0, False, "args"
            return True
        return self._arguments(final, deltas)

    def _arguments(self, final: bool, deltas: list[CallDelta]) -> bool:
        if not self.args_started:  # the opening fence, when there is one, is not part of the arguments
            if ARGS_OPEN.startswith(self.buf) and not final:
                return False
            self.buf = self.buf.removeprefix(ARGS_OPEN)
            self.args_started = True
        i, marker = _first(self.buf, (CALL_END, CALLS_END))
        if marker is not None or final:
            arguments = _CLOSING.sub("", self.buf if marker is None else self.buf[:i], count=1)
        else:  # hold back what may still become the closing fence or the call's end
            body = self.buf[:len(self.buf) - _partial(self.buf, (CALL_END, CALLS_END))]
            arguments = body[:_MAYBE_CLOSING.search(body).start()]
        if len(arguments) > self.sent:  # what was sent is always a prefix of this
            deltas.append(CallDelta(self.calls - 1, None, arguments[self.sent:]))
            self.sent = len(arguments)
        if marker is None:
            if final:
                self.buf = ""
            return False
        self.buf = self.buf[i + len(marker):]
        self.state = "block" if marker == CALL_END else "text"
        return True


def _merged(deltas: list[CallDelta]) -> list[CallDelta]:
    """One delta per call and feed: a call's name and its arguments so far travel together."""
    out: list[CallDelta] = []
    for d in deltas:
        if out and out[-1].index == d.index:
            out[-1].arguments += d.arguments
        else:
            out.append(CallDelta(d.index, d.name, d.arguments))
    return out


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer."""
    content, deltas = ToolCallParser().feed(text, final=True)
    calls: list[ToolCall] = []
    for d in deltas:
        if d.name is not None:
            calls.append(ToolCall(d.name, ""))
        calls[d.index].arguments += d.arguments
    return content, calls
