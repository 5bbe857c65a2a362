"""Request bodies of the OpenAI API subset we serve, and OpenAI's error JSON.

Types and ranges are checked here (pydantic, strict mode) so a bad request becomes a 400 naming the
field before it reaches the tokenizer or the engine. Strict as OpenAI is: no coercion (the string "1"
is not a number, 1 is not `true`), no NaN or Infinity. Text must be valid Unicode: a string holding an
unpaired surrogate (JSON "\ud800") or NUL is refused, never repaired. Unknown roles and content-part
types are refused; unknown top-level fields are ignored, as OpenAI does. Engine extras that vLLM also
accepts (top_k, min_p, repetition_penalty, ignore_eos, chat_template_kwargs) ride along in the same body, and
DeepSeek's `thinking` switch beside OpenAI's `reasoning_effort` and `response_format`.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator


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


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "developer"]
    content: Optional[Union[Text, list[TextPart]]] = None  # a string or OpenAI's list of text parts
    reasoning_content: Optional[Text] = None
    name: Optional[Text] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


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


class CompletionRequest(_Sampling):
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # legacy API: an int, the number of top tokens
    echo: bool = False
    temperature: float = Field(1.0, ge=0, le=2)
