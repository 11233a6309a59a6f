"""The narrow engine protocol callers depend on (after vLLM's EngineClient).

Replicas talk to `EngineClient` and never name an engine class (the benchmarks
construct engines themselves, then use only this protocol), so a different
runtime (or a fake in unit tests) fits behind the same seam. Which runtime a
replica holds is the config's `engine.kind`: `kinds.build_engine` is the one
place that turns it into an engine (vLLM by default, llama.cpp where its extra
is installed).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from airan.config import ConfigError


class Grammar(Protocol):
    """A constrained-decoding language: engines read it as a regex (vLLM) or a GBNF grammar (llama.cpp)."""

    def regex(self) -> str: ...

    def gbnf(self) -> str: ...


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    # a JSON schema the output must follow (structured outputs), if any
    json_schema: dict | None = None
    # or a grammar (e.g. airan.core.diagnosis.AnswerGrammar): each engine takes the form it supports
    grammar: Grammar | None = None
    # name of the LoRA adapter to apply; the replica must hold it
    lora: str | None = None
    # keep generating past end-of-sequence (fixed-length runs in benchmarks)
    ignore_eos: bool = False
    # engine scheduling order where the engine has one (vLLM's priority policy): smaller runs first
    # (airan.core.admission.engine_priority: the class, then the deadline)
    priority: int = 0


@dataclass(frozen=True)
class GenerationChunk:
    """New text since the previous chunk; the last one has `finished` set."""

    text_delta: str
    completion_tokens: int  # cumulative
    prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    # engine-side queueing before the request was first scheduled
    engine_queue_ms: float | None = None
    # last chunk, from the engine's own timestamps where it keeps them: scheduled to first token
    # (prefill) and first to last token (decode); admission learns each replica's speed from them
    prefill_ms: float | None = None
    decode_ms: float | None = None
    # the tokens this chunk adds (its text may lag them: a character split across tokens waits for
    # the rest); a stream whose replica dies goes on elsewhere from these (airan/serving/gateway.py)
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    extra: dict = field(default_factory=dict)


class EngineDeadError(RuntimeError):
    """The engine process is gone; the replica must be replaced."""


class ReplicaUnavailableError(RuntimeError):
    """The replica cannot be reached (actor dead, node gone)."""


class RequestFailedError(RuntimeError):
    """One request failed; the engine is still fine."""


class EngineUnavailableError(ConfigError):
    """The configured `engine.kind` cannot run here (its extra is not installed, its file is
    missing); the message says what to install or fix. Raised at startup, before any replica."""


@runtime_checkable
class EngineClient(Protocol):
    max_model_len: int

    async def start(self) -> None: ...

    def generate(
        self, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        """Stream chunks; aborts the request if the consumer stops early."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def load(self) -> EngineLoad: ...

    async def check_health(self) -> None: ...

    async def shutdown(self) -> None: ...
