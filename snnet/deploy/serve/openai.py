"""The OpenAI-compatible side of a language-model server: what a request may hold, and the answers.

:func:`parse_request` reads the JSON body of ``POST /v1/completions`` or ``POST
/v1/chat/completions`` into a :class:`CompletionRequest`, checking every field the way OpenAI's
API documents it; anything else is refused with one line that names the field (a :class:`Rejected`
400): an unknown field, an unsupported one other than at its default (``logprobs``, ``n`` other than
1, ``presence_penalty`` other than 0 ...), a wrong type, a value out of range. :func:`completion`, :func:`chunk` and :func:`error_body` build the answers in
OpenAI's shapes, so OpenAI's own client libraries read them; each answer also carries an
``snnet`` object (the stitch that served, its mode, the measured TTFT and TPOT).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .rejected import Rejected

__all__ = ["BadRequest", "CompletionRequest", "MAX_STOP", "chunk", "completion", "error_body", "new_id", "parse_request"]

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_SEED = 2 ** 63  # torch.manual_seed takes less than 2**64; a signed 64-bit seed is what clients send
ROLES = ("system", "user", "assistant", "developer")


@dataclass(frozen=True)
class CompletionRequest:
    """One checked request: the prompt (completions) or messages (chat), and the sampling options."""

    chat: bool
    model: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    max_tokens: int | None = None  # None: the default of the endpoint (see parse_request)
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


class BadRequest(Rejected):
    """A 400 that names the field at fault (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message, "bad_request")
        self.param = param


_bad = BadRequest


def _number(v: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"`{name}` must be a number, got {_show(v)}", name)
    if v < low or v > high or (low_open and v == low):
        raise _bad(f"`{name}` must be {'>' if low_open else '>='} {low:g} and <= {high:g}, got {v:g}", name)
    return float(v)


def _whole(v: Any, name: str, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"`{name}` must be a whole number, got {_show(v)}", name)
    if not low <= v <= high:
        raise _bad(f"`{name}` must be from {low} to {high}, got {v}", name)
    return v


def _show(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad(f"`stop` must be a string or a list of strings, got {_show(v)}", "stop")
    if len(stops) > MAX_STOP:
        raise _bad(f"`stop` takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):  # (its own message: "at most 4 ..., got 1" did not say what was wrong)
        raise _bad("`stop` strings must not be empty: drop the empty one", "stop")
    return tuple(stops)


def _prompt(v: Any) -> str:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]  # a batch of one prompt
    if not isinstance(v, str):
        raise _bad("`prompt` must be a string (or a list of one string; token-id prompts and batches are not served), "
                   f"got {_show(v)}", "prompt")
    if not v:
        raise _bad("`prompt` is empty: give at least one character of text", "prompt")
    return v


def _messages(v: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, list) or not v:
        raise _bad(f"`messages` must be a non-empty list of {{\"role\", \"content\"}} objects, got {_show(v)}", "messages")
    out = []
    for k, m in enumerate(v):
        where = f"messages[{k}]"
        if not isinstance(m, dict):
            raise _bad(f"`{where}` must be an object with `role` and `content`, got {_show(m)}", where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise _bad(f"`{where}.{extra[0]}` is not supported: a message holds `role` and `content` (text)", f"{where}.{extra[0]}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _bad(f"`{where}.role` must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                             for p in content):
            content = "".join(p["text"] for p in content)  # text parts, as OpenAI's newer clients send them
        if not isinstance(content, str):
            raise _bad(f"`{where}.content` must be text (a string or a list of text parts), got {_show(content)}",
                       f"{where}.content")
        out.append((role, content))
    return tuple(out)


def _stream_options(v: Any) -> bool:
    if v is None:
        return False
    if not isinstance(v, dict) or set(v) - {"include_usage"} or not isinstance(v.get("include_usage", False), bool):
        raise _bad("`stream_options` may only hold `include_usage` (true or false)", "stream_options")
    return bool(v.get("include_usage", False))


def _n(v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v != 1:  # 1.0 too: whole-number fields refuse floats
        raise _bad(f"`n` must be 1 (one completion per request), got {_show(v)}", "n")


def _user(v: Any) -> None:
    if not isinstance(v, str):
        raise _bad(f"`user` must be a string, got {_show(v)}", "user")


def _bool(name: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise _bad(f"`{name}` must be true or false, got {_show(v)}", name)
        return v
    return check


def _default_only(name: str, is_default: Callable[[Any], bool], default: str) -> Callable[[Any], None]:
    """Fields this server does not implement, taken at their defaults only: clients (OpenAI's own, LangChain)
    send ``"logprobs": false`` or ``"presence_penalty": 0`` explicitly, which a refusal by name broke."""
    def check(v: Any) -> None:
        if not is_default(v):
            raise _bad(f"`{name}` is not supported here: only its default ({default}) is accepted, got {_show(v)}", name)
    return check


def _zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


# taken at their defaults (a null is the default and skipped before any check)
_DEFAULT_ONLY: dict[str, tuple[None, Callable[[Any], Any]]] = {
    "logprobs": (None, _default_only("logprobs", lambda v: v is False, "null or false")),
    "top_logprobs": (None, _default_only("top_logprobs", _zero, "null or 0")),
    "presence_penalty": (None, _default_only("presence_penalty", _zero, "0")),
    "frequency_penalty": (None, _default_only("frequency_penalty", _zero, "0")),
    "logit_bias": (None, _default_only("logit_bias", lambda v: v == {}, "null or {}")),
}

# field -> (CompletionRequest attribute or None, checker); fields that carry nothing here (n=1, user) map to None
_COMMON: dict[str, tuple[str | None, Callable[[Any], Any]]] = {
    "temperature": ("temperature", lambda v: _number(v, "temperature", 0, 2)),
    "top_p": ("top_p", lambda v: _number(v, "top_p", 0, 1, low_open=True)),
    "stop": ("stop", _stop),
    "seed": ("seed", lambda v: None if v is None else _whole(v, "seed", 0, MAX_SEED - 1)),
    "stream": ("stream", _bool("stream")),
    "stream_options": ("include_usage", _stream_options),
    "n": (None, _n),
    "user": (None, _user),
}
_FIELDS: dict[bool, dict[str, tuple[str | None, Callable[[Any], Any]]]] = {
    False: {"prompt": ("prompt", _prompt), "max_tokens": ("max_tokens", lambda v: _whole(v, "max_tokens", 1, 2 ** 31)), **_COMMON},
    True: {"messages": ("messages", _messages), "max_tokens": ("max_tokens", lambda v: _whole(v, "max_tokens", 1, 2 ** 31)),
           "max_completion_tokens": ("max_tokens", lambda v: _whole(v, "max_completion_tokens", 1, 2 ** 31)), **_COMMON},
}


def parse_request(body: Any, chat: bool) -> CompletionRequest:
    """The request in a decoded JSON body, every field checked (see the module)."""
    what = "chat/completions" if chat else "completions"
    if not isinstance(body, dict):
        raise _bad(f"the body must be a JSON object with `model` and `{'messages' if chat else 'prompt'}`, got {_show(body)}")
    known = _FIELDS[chat]
    for name in body:
        if name != "model" and name not in known and name not in _DEFAULT_ONLY:
            raise _bad(f"`{name}` is not supported by /v1/{what} here; it accepts: model, {', '.join(known)}", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad(f"`model` is required: the name this server serves (GET /v1/models), got {_show(model)}", "model")
    need = "messages" if chat else "prompt"
    if need not in body:
        raise _bad(f"`{need}` is required", need)
    if chat and body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:  # null: not given
        raise _bad("give `max_tokens` or `max_completion_tokens`, not both", "max_completion_tokens")
    values: dict[str, Any] = {}
    for name, v in body.items():
        if name == "model" or (v is None and name not in (need,)):
            continue  # null means the default, as OpenAI reads it
        attr, check = known[name] if name in known else _DEFAULT_ONLY[name]
        checked = check(v)
        if attr is not None:
            values[attr] = checked
    if values.get("include_usage") and not values.get("stream"):
        raise _bad("`stream_options` is only for `stream: true`", "stream_options")
    return CompletionRequest(chat=chat, model=model, **values)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def completion(rid: str, chat: bool, model: str, text: str, finish: str, usage: Mapping[str, int],
               snnet: Mapping[str, Any]) -> dict[str, Any]:
    """A whole answer: ``text_completion`` or ``chat.completion``."""
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
                              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": dict(usage), "snnet": dict(snnet)}


def chunk(rid: str, chat: bool, model: str, created: int, text: str | None, finish: str | None = None, *, role: bool = False,
          usage: Mapping[str, int] | None = None, snnet: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One server-sent event of a streamed answer. ``text`` None with ``usage``: the usage chunk (no choices)."""
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                           "model": model}
    if text is None and usage is not None:
        out["choices"] = []
    elif chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    if usage is not None:
        out["usage"] = dict(usage)
    if snnet is not None:
        out["snnet"] = dict(snnet)
    return out
