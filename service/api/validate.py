"""Requests checked once, for every front: pure functions from a request message to the parameters the
engine takes, raising ``Refused`` (a status code and a message that names the limit) for what is out of
bounds. The gRPC servicer (and any other front) only converts and calls."""

from __future__ import annotations

import math

import grpc

from service.api.config import ServerConfig
from service.model.generation import GenerationParams
from service.model.personal import units
from service.model.typing_session import TypingSession
from service.pb.nextword.v1 import nextword_pb2 as pb

DEFAULT_SUGGESTIONS = 3
DEFAULT_CANDIDATES = 9
DEFAULT_MAX_TOKENS = 64
MAX_TEMPERATURE = 10.0
MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 64


class Refused(Exception):
    """A request the server will not serve: ``code`` and a message for the caller."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Invalid(Refused):
    """A request outside the limits: INVALID_ARGUMENT with this message."""

    code = grpc.StatusCode.INVALID_ARGUMENT


def text(value: str, field: str, config: ServerConfig, required: bool = True) -> str:
    if required and not value:
        raise Invalid(f"{field} must not be empty")
    if len(value) > config.max_text_chars:
        raise Invalid(f"{field} has {len(value)} characters; the limit is {config.max_text_chars}")
    return value


def count(value: int, default: int, config: ServerConfig, field: str = "num_suggestions") -> int:
    """How many suggestions or candidates a request asks for (0: ``default``)."""
    if value > config.max_suggestions:
        raise Invalid(
            f"{field} is {value}; it must be 0 (meaning {default}) to {config.max_suggestions} "
            "(server setting max_suggestions)"
        )
    return value or default


def pinyin(letters: str, config: ServerConfig) -> str:
    if len(letters) > config.max_pinyin_letters:
        raise Invalid(
            f"pinyin has {len(letters)} letters; the limit is {config.max_pinyin_letters} "
            "(server setting max_pinyin_letters)"
        )
    return letters


def generation(request: pb.GenerateRequest, config: ServerConfig) -> GenerationParams:
    temperature = request.temperature if request.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise Invalid(f"temperature is {temperature}; it must be from 0 to {MAX_TEMPERATURE:g} (0 is greedy)")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise Invalid(f"top_p is {top_p}; it must be in (0, 1]")
    if request.max_tokens > config.max_generate_tokens:
        raise Invalid(f"max_tokens is {request.max_tokens}; the limit is {config.max_generate_tokens}")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise Invalid(f"{len(request.stop)} stop strings; the limit is {MAX_STOP_STRINGS}")
    for stop in request.stop:
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise Invalid(f"a stop string has {len(stop)} characters; each must have 1 to {MAX_STOP_CHARS}")
    return GenerationParams(
        temperature=temperature,
        top_k=request.top_k,
        top_p=top_p,
        max_tokens=request.max_tokens or min(DEFAULT_MAX_TOKENS, config.max_generate_tokens),
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
    )


def word_to_forget(request: pb.ForgetRequest, config: ServerConfig) -> str | None:
    """The word a Forget names, or None for everything (which takes ``everything``, never a blank word)."""
    if request.everything:
        if request.word:
            raise Invalid("give word or everything, not both")
        return None
    if len(request.word) > config.max_text_chars:
        raise Invalid(f"word has more than {config.max_text_chars} characters")
    if not any(units(request.word)):
        raise Invalid("word has no letters, digits or characters to forget; to forget everything, set everything")
    return request.word


def apply_edit(session: TypingSession, request: pb.TypeRequest, index: int) -> None:
    """One Type edit; ``index`` (from 1) names it in errors."""
    kind = request.WhichOneof("edit")
    if kind == "compose":
        if not request.compose:
            raise Invalid(f"edit {index}: compose must not be empty")
        session.compose(request.compose)
    elif kind == "select":
        session.select(request.select)
    elif kind == "append":
        if not request.append:
            raise Invalid(f"edit {index}: append must not be empty")
        session.append(request.append)
    elif kind == "delete":
        if request.delete < 1:
            raise Invalid(f"edit {index}: delete must be at least 1")
        session.delete(request.delete)
    elif kind == "reset":
        session.reset()
    elif kind is None and not request.num_suggestions:
        raise Invalid(f"edit {index}: give append, delete, reset, commit, compose or select")
