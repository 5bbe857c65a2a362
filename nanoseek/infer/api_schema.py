"""Request bodies of the OpenAI API subset we serve, and OpenAI's error JSON.

Types and ranges are checked here (pydantic, strict mode) so a bad request becomes a 400 naming the
field before it reaches the tokenizer or the engine. Strict as OpenAI is: no coercion (the string "1"
is not a number, 1 is not `true`), no NaN or Infinity. Text must be valid Unicode: a string holding an
unpaired surrogate (JSON "\ud800") or NUL is refused, never repaired. Unknown roles and content-part
types are refused; unknown top-level fields are ignored, as OpenAI does. Engine extras that vLLM also
accepts (top_k, min_p, repetition_penalty, ignore_eos, chat_template_kwargs) ride along in the same body, and
DeepSeek's `thinking` switch beside OpenAI's `reasoning_effort`, `response_format`, `tools` and `tool_choice`.
A rule that ties two fields (a tool message's `tool_call_id`, a `tool_choice` naming a tool) is checked on the
field it is about, so the 400 names that field.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictStr, ValidationInfo, field_validator,
                      model_validator)


class APIError(Exception):
    """An error the client caused (or must see): rendered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def _valid_unicode(s: str) -> str:
    # json.loads turns a lone "\ud800" escape into a str no tokenizer (nor UTF-8) can encode
    bad = _NOT_TEXT.search(s)
    if bad:
        what = "NUL" if bad.group() == "\x00" else f"an unpaired surrogate U+{ord(bad.group()):04X}"
        raise ValueError(f"invalid Unicode: {what} at character {bad.start()}")
    return s


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]  # image, audio and file parts: this server serves a text model
    text: Text


class CalledFunction(BaseModel):
    model_config = STRICT
    name: Text
    arguments: Text  # JSON text, as the model wrote it


class ToolCallIn(BaseModel):
    """A call in an assistant message of the history (what a response's tool_calls held)."""
    model_config = STRICT
    id: Text
    type: Literal["function"]
    function: CalledFunction


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[Text, list[TextPart]]] = None  # a string or OpenAI's list of text parts
    reasoning_content: Optional[Text] = None
    name: Optional[Text] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[Text] = Field(None, validate_default=True)

    @field_validator("tool_calls")
    @classmethod
    def _calls_from_the_assistant(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message holds tool_calls")
        return v

    @field_validator("tool_call_id")
    @classmethod
    def _tool_result_names_its_call(cls, v, info: ValidationInfo):
        if v is None and info.data.get("role") == "tool":
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionSpec(BaseModel):
    model_config = STRICT
    name: Text = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule
    description: Optional[Text] = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Optional[bool] = None  # the schema is always enforced where a call is forced


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = STRICT
    name: Text


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = STRICT

    model: Text
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[Text, list[Text]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[Text] = None
    # engine extras (vLLM names)
    top_k: int = Field(0, ge=0, le=1 << 30)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        v = [v] if isinstance(v, str) else v
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v


class ThinkingSwitch(BaseModel):
    """DeepSeek's `thinking`; budget_tokens (Anthropic's name) caps the reasoning."""
    model_config = STRICT
    type: Literal["enabled", "disabled"]
    budget_tokens: Optional[int] = Field(None, ge=1)


class JSONSchemaFormat(BaseModel):
    model_config = STRICT
    name: Text = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None  # the schema is always enforced; strict=false is accepted for compatibility
    description: Optional[Text] = None


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    thinking: Optional[ThinkingSwitch] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = Field(None, max_length=128)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _names_unique(cls, v):
        names = [t.function.name for t in v or []]
        if len(set(names)) < len(names):
            raise ValueError("two tools share a name")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, v, info: ValidationInfo):
        if "tools" not in info.data:  # the tools were invalid: that error is the one to see
            return v
        names = [t.function.name for t in info.data["tools"] or []]
        if v not in (None, "none", "auto") and not names:
            raise ValueError("a required or named tool_choice needs tools")
        if isinstance(v, NamedToolChoice) and v.function.name not in names:
            raise ValueError(f"no tool named {v.function.name!r} in tools ({', '.join(names)})")
        return v


class CompletionRequest(_Sampling):
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # legacy API: an int, the number of top tokens
    echo: bool = False
    temperature: float = Field(1.0, ge=0, le=2)
