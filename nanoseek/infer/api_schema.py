"""Request bodies of the OpenAI API subset we serve, and OpenAI's error JSON.

Ranges are checked here (pydantic) so a bad request becomes a 400 before it reaches the engine;
unknown fields are ignored, as OpenAI does. Engine extras that vLLM also accepts (top_k, min_p,
repetition_penalty, ignore_eos) ride along in the same body.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator


class APIError(Exception):
    """An error the client caused (or must see): rendered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    # content: a string or OpenAI's list of {"type": "text", "text": ...} parts
    content: Optional[Union[StrictStr, list[dict]]] = None
    reasoning_content: Optional[StrictStr] = None
    name: Optional[StrictStr] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in self.content):
                raise APIError(400, "only text content parts are supported", param="messages")
            return "".join(p["text"] for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
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


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # legacy API: an int, the number of top tokens
    echo: bool = False
    temperature: float = Field(1.0, ge=0, le=2)
