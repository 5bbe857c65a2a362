"""Structured output: OpenAI's `response_format` (json_object, json_schema) as a token mask on the answer.

llguidance compiles the JSON schema into a grammar over the model's own tokenizer and gives, at each step,
the tokens that keep the output a valid prefix; the engine masks the rest (nanoseek/infer/guide.py). Chosen
over xgrammar after measuring both on this CPU (benchmarks/structured_output.py): compiling a schema takes
llguidance a third of xgrammar's time and its mask a few tenths of a millisecond per token, both small next
to a decode step, and it is one self-contained wheel (xgrammar pulls in triton, ~1 GB, on Linux).

The output is compact JSON (no free whitespace between tokens, so a model cannot pad forever), and ends
with the tokenizer's stop token once the value is complete. llguidance is imported only when a request asks
for structured output.
"""
from __future__ import annotations

import torch

from nanoseek.infer.api_schema import APIError

COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class JSONMatcher:
    """One sequence's grammar state (guide.TokenMatcher): the allowed tokens as a bool mask [V]."""

    def __init__(self, llguidance, tokenizer, grammar: str, vocab_size: int):
        self.m = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.V = vocab_size
        self.shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        if self.m.is_error():
            return torch.zeros(self.V, dtype=torch.bool)
        words = torch.frombuffer(bytearray(self.m.compute_bitmask()), dtype=torch.int32)
        return ((words.view(-1, 1) >> self.shifts) & 1).flatten()[:self.V].bool()

    def accept(self, token: int) -> None:
        self.m.consume_token(token)


class JSONGrammars:
    """Per server: the model's tokenizer as llguidance sees it (built on first use: it walks the vocabulary),
    and a grammar for each response_format."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int]):
        self.tokenizer, self.V, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._ll = self._lltok = None

    def grammar(self, response_format) -> str | None:
        """The grammar of a request's response_format (None for plain text); 400 for a schema it cannot take."""
        if response_format is None or response_format.type == "text":
            return None
        schema = {"type": "object"} if response_format.type == "json_object" else response_format.json_schema.schema_
        return self.schema_grammar(schema, "response_format.json_schema.schema", "response_format")

    def schema_grammar(self, schema: dict, where: str, param: str) -> str:
        """The grammar of one JSON schema; a 400 naming `where` (and `param`) when llguidance refuses it."""
        self._load()
        try:
            grammar = self._ll.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
        except (ValueError, TypeError, RuntimeError) as e:
            raise APIError(400, f"{where}: {e}", param=param) from e
        return self._checked(grammar, where, param)

    def lark_grammar(self, lark: str, where: str, param: str) -> str:
        """A grammar written in llguidance's Lark (which may embed JSON schemas as `%json {...}`)."""
        self._load()
        return self._checked(self._ll.LLMatcher.grammar_from_lark(lark), where, param)

    def _checked(self, grammar: str, where: str, param: str) -> str:
        bad, errors = self._ll.LLMatcher.validate_grammar_with_warnings(grammar, self._lltok)
        if bad:
            raise APIError(400, f"{where}: {'; '.join(errors)}", param=param)
        return grammar

    def matcher(self, grammar: str) -> JSONMatcher:
        return JSONMatcher(self._ll, self._lltok, grammar, self.V)

    def _load(self) -> None:
        if self._ll is None:
            import llguidance  # the serve extra's grammar engine: only response_format needs it
            self._lltok = llguidance.LLTokenizer(self.tokenizer.tk.to_str(), n_vocab=self.V, eos_token=self.stop_ids)
            self._ll = llguidance
