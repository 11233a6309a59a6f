"""The control plane's core: validate, route, dispatch, fail over, time, answer.

Talks to replicas only through the `ReplicaPool`/`ReplicaClient` protocols, so
it is unit-tested with in-process fakes and served with Ray actors. Every
accepted query ends in exactly one `Answer` or one `AiranError`.

Request ids: the gateway mints none. Each call is answered under the id its
caller gives (`request_id=`; for gRPC calls the request-id interceptor mints one
per call, see airan/serving/api/interceptors.py). `Query.request_id` is only the
client's idempotency key: when set, it is also the call's id and a retry gets
the first answer; when empty, nothing is remembered.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from airan.config import AiranConfig
from airan.serving.engine.protocol import (
    EngineDeadError,
    GenerationChunk,
    GenerationParams,
    ReplicaUnavailableError,
    RequestFailedError,
)
from airan.core.detector import Detector
from airan.core.diagnosis import Diagnosis, InvalidDiagnosis
from airan.core.prompting import DiagnosisContext, RenderedPrompt, diagnosis_context
from airan.core.retrieval import Citation, parse_citations
from airan.errors import AiranError, ErrorKind
from airan.core.query import Query, validate_query
from airan.core.routing import ReplicaView, Router, RoutingContext, RoutingRequest
from airan.serving.sites import SiteRegistry


class ReplicaClient(Protocol):
    def generate(
        self, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]: ...

    async def abort(self, request_id: str) -> None: ...


class ReplicaPool(Protocol):
    def views(self) -> list[ReplicaView]: ...

    def client(self, replica_id: str) -> ReplicaClient: ...

    def mark_failed(self, replica_id: str, reason: str) -> None: ...

    def node_ids(self) -> Mapping[str, str]:
        """Replica id -> id of the (Ray) node it runs on; "" or absent until it is placed."""
        ...


class PromptRendererLike(Protocol):
    def render(
        self, query: Query, budget_tokens: int, diagnosis: DiagnosisContext | None = None
    ) -> RenderedPrompt: ...


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Answer:
    request_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    replica_id: str
    site_id: str
    model: str
    finish_reason: str
    queue_ms: float
    ttft_ms: float
    total_ms: float
    prompt: RenderedPrompt | None = None
    diagnosis: Diagnosis | None = None
    attempts: int = 1
    citations: tuple[Citation, ...] = ()  # free text: the shown passages the answer cites
    citations_dropped: int = 0  # cited ids that were not shown for this request


class _IdempotencyCache:
    """Answers by request_id, so a controller's retry gets the same answer once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.completed: OrderedDict[str, Answer] = OrderedDict()
        self.in_flight: dict[str, asyncio.Future] = {}

    def store(self, answer: Answer) -> None:
        if self.size:
            self.completed[answer.request_id] = answer
            while len(self.completed) > self.size:
                self.completed.popitem(last=False)


class Gateway:
    # replicas tried per query when one fails before its first token
    MAX_ATTEMPTS = 3

    def __init__(
        self,
        config: AiranConfig,
        pool: ReplicaPool,
        sites: SiteRegistry,
        renderers: Mapping[str, PromptRendererLike],
        router: Router | None = None,
        clock: Callable[[], float] = time.monotonic,
        detector: Detector | None = None,
    ) -> None:
        self.config = config
        self.detector = detector  # evidence the model sees; None: the prompt carries the KPI evidence only
        self.pool = pool
        self.sites = sites
        self.renderers = renderers
        self.router = router or Router.from_config(config.router)
        self.clock = clock
        self.in_flight: Counter[str] = Counter()
        self._cache = _IdempotencyCache(config.limits.idempotency_cache_size)

    # -- views ---------------------------------------------------------------
    def replica_views(self) -> list[ReplicaView]:
        return [replace(v, in_flight=self.in_flight[v.replica_id]) for v in self.pool.views()]

    def site_in_flight(self, site_id: str) -> int:
        return sum(self.in_flight[v.replica_id] for v in self.pool.views() if v.site_id == site_id)

    def replica_node_ids(self) -> dict[str, str]:
        """Replica id -> node id, for operators' views (empty string until placed)."""
        return dict(self.pool.node_ids())

    def remembers(self, idempotency_key: str) -> bool:
        """Whether an answer for this client key is kept or being computed (a retry would share it)."""
        return idempotency_key in self._cache.completed or idempotency_key in self._cache.in_flight

    # -- entry points ----------------------------------------------------------
    async def ask(self, query: Query, arrival: float | None = None, *, request_id: str = "") -> Answer:
        """Unary: the whole answer; a retried idempotency key shares the first call's answer."""
        key = query.request_id
        if key and key in self._cache.in_flight:
            return await asyncio.shield(self._cache.in_flight[key])
        answer = None
        async for event in self.stream(query, arrival, request_id=request_id):
            if isinstance(event, Answer):
                answer = event
        assert answer is not None, "a run always ends in an Answer or an error"
        return answer

    async def stream(
        self, query: Query, arrival: float | None = None, *, request_id: str = ""
    ) -> AsyncIterator[Delta | Answer]:
        """Streaming: deltas, then exactly one final Answer (or an AiranError).

        `request_id` is the id this call is answered under; with a client key
        (`query.request_id`) the key is the id. A call with neither is a caller's bug.
        """
        key = query.request_id
        if key and request_id and request_id != key:
            raise ValueError(f"request_id '{request_id}' differs from the client's key '{key}'")
        if not (key or request_id):
            raise ValueError("every call needs an id: pass request_id= (gRPC calls get one from the interceptor)")
        if key and key in self._cache.completed:
            yield self._cache.completed[key]
            return
        if key and key in self._cache.in_flight:
            raise AiranError(
                ErrorKind.ALREADY_EXISTS,
                f"request_id '{key}' is already being answered; wait for it or use a new request_id",
            )
        if not key:  # a one-off call: nothing to remember
            async for event in self._run(replace(query, request_id=request_id), arrival):
                yield event
            return
        # claim the key so a concurrent retry waits for this answer instead of recomputing it
        future = asyncio.get_running_loop().create_future()
        self._cache.in_flight[key] = future
        try:
            async for event in self._run(query, arrival):
                if isinstance(event, Answer):
                    self._cache.store(event)
                    future.set_result(event)
                yield event
        except BaseException as e:
            if not future.done():
                cause = e if isinstance(e, Exception) else AiranError(ErrorKind.CANCELLED, "request cancelled")
                future.set_exception(cause)
                future.exception()  # mark retrieved: there may be no waiter
            raise
        finally:
            if not future.done():  # the consumer stopped reading before the end
                future.set_exception(AiranError(ErrorKind.CANCELLED, "request cancelled"))
                future.exception()
            self._cache.in_flight.pop(key, None)

    # -- the pipeline ------------------------------------------------------------
    async def _run(self, query: Query, arrival: float | None) -> AsyncIterator[Delta | Answer]:
        arrival = self.clock() if arrival is None else arrival
        query = validate_query(query, self.config.limits, self.sites.ids, self.clock())
        model = query.model or self.config.default_model
        if model not in self.renderers:
            raise AiranError(
                ErrorKind.NOT_FOUND,
                f"unknown model '{model}'; served models: {', '.join(self.renderers)}",
            )
        query = replace(query, model=model)
        spec = self.config.model(model)
        max_len = self.config.model(spec.parent).max_model_len if spec.is_adapter else spec.max_model_len
        lora = model if spec.is_adapter else None
        diagnosis = diagnosis_context(query, self.detector) if query.mode == "diagnosis" else None
        prompt = self.renderers[model].render(query, max_len - query.max_tokens, diagnosis)

        request = RoutingRequest(
            request_id=query.request_id,
            model=model,
            controller_id=query.controller_id,
            site_ids=query.site_ids,
            priority=query.priority,
            prompt_tokens=len(prompt.token_ids),
            max_tokens=query.max_tokens,
        )
        ctx = RoutingContext(request, self.sites.views(), self.sites.min_ai_headroom)
        decision = self.router.choose_replicas(ctx, self.replica_views())
        if not decision.tiers:
            raise AiranError(ErrorKind.UNAVAILABLE, f"no replica can take this query: {decision.rejection}")

        if query.mode != "diagnosis":
            params = GenerationParams(max_tokens=query.max_tokens, temperature=query.temperature, lora=lora)
            async for event in self._dispatch(query, decision.ranked, prompt, params, arrival):
                if isinstance(event, Answer):
                    cited, dropped = parse_citations(event.text, prompt.passages)
                    event = replace(event, citations=cited, citations_dropped=dropped)
                yield event
            return

        # Diagnosis: decode under the request's compact grammar, check every rule, retry once (sampling,
        # so the retry can differ) while the deadline allows; never return an invalid one.
        grammar = diagnosis.grammar(prompt.citable_kpis)
        params = GenerationParams(query.max_tokens, query.temperature, grammar=grammar, lora=lora)
        problems = []
        for attempt in (1, 2):
            answer = None
            async for event in self._dispatch(query, decision.ranked, prompt, params, arrival, attempt):
                if isinstance(event, Answer):
                    answer = event  # diagnosis mode streams no text deltas: only checked answers leave
            try:
                parsed = diagnosis.parse(answer.text, prompt.citable_kpis, truncated=answer.finish_reason == "length")
                answer = replace(answer, diagnosis=parsed, attempts=attempt)
            except InvalidDiagnosis as e:
                problems.append(str(e))
                if query.deadline is not None and query.deadline <= self.clock():
                    break
                params = replace(params, temperature=max(0.7, query.temperature), seed=attempt)
                continue
            yield answer
            return
        raise AiranError(
            ErrorKind.INTERNAL,
            f"model '{model}' gave no valid diagnosis in {len(problems)} attempt(s) "
            f"({'; '.join(problems)}); retry, or ask in free-text mode",
        )

    async def _dispatch(
        self,
        query: Query,
        ranked: list[ReplicaView],
        prompt: RenderedPrompt,
        params: GenerationParams,
        arrival: float,
        attempt: int = 1,
    ) -> AsyncIterator[Delta | Answer]:
        """Run on the best replica; fail over to the next if one fails before its first token."""
        failures: list[str] = []
        for replica in ranked[: self.MAX_ATTEMPTS]:
            started = False
            try:
                async for event in self._on_replica(query, replica, prompt, params, arrival, attempt):
                    started = True
                    yield event
                return
            except (EngineDeadError, RequestFailedError, ReplicaUnavailableError) as e:
                if isinstance(e, (EngineDeadError, ReplicaUnavailableError)):
                    self.pool.mark_failed(replica.replica_id, str(e))
                if started:
                    raise AiranError(
                        ErrorKind.UNAVAILABLE,
                        f"replica {replica.replica_id} at {replica.site_id} failed mid-answer ({e}); "
                        "retry the query",
                    ) from e
                failures.append(f"{replica.replica_id}: {e}")
        raise AiranError(ErrorKind.UNAVAILABLE, "every chosen replica failed: " + "; ".join(failures))

    async def _on_replica(
        self,
        query: Query,
        replica: ReplicaView,
        prompt: RenderedPrompt,
        params: GenerationParams,
        arrival: float,
        attempt: int,
    ) -> AsyncIterator[Delta | Answer]:
        client = self.pool.client(replica.replica_id)
        # a retry is a new engine request; the id the caller sees stays the same
        engine_request_id = query.request_id if attempt == 1 else f"{query.request_id}#{attempt}"
        dispatched = self.clock()
        first_token_at = None
        engine_queue_ms = 0.0
        text: list[str] = []
        last: GenerationChunk | None = None
        self.in_flight[replica.replica_id] += 1
        chunks = aiter(client.generate(prompt.token_ids, params, engine_request_id))
        try:
            while True:
                # the deadline bounds the replica's work, not the caller's time at `yield`
                remaining = None if query.deadline is None else query.deadline - self.clock()
                try:
                    async with asyncio.timeout(remaining):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                if first_token_at is None:
                    first_token_at = self.clock()
                    engine_queue_ms = chunk.engine_queue_ms or 0.0
                last = chunk
                if chunk.text_delta:
                    text.append(chunk.text_delta)
                    yield Delta(chunk.text_delta)
        except TimeoutError:
            tokens = last.completion_tokens if last else 0
            raise AiranError(
                ErrorKind.DEADLINE_EXCEEDED,
                f"deadline passed {1000 * (self.clock() - arrival):.0f} ms after arrival while "
                f"replica {replica.replica_id} at {replica.site_id} was answering ({tokens} tokens so far)",
            ) from None
        finally:
            self.in_flight[replica.replica_id] -= 1
            if self.in_flight[replica.replica_id] <= 0:
                del self.in_flight[replica.replica_id]
            await chunks.aclose()  # aborts the engine request if it is still running
        if last is None or not last.finished:
            raise ReplicaUnavailableError(f"replica {replica.replica_id} ended the stream without finishing")
        done = self.clock()
        answer = Answer(
            request_id=query.request_id,
            text="".join(text),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            replica_id=replica.replica_id,
            site_id=replica.site_id,
            model=query.model,
            finish_reason=last.finish_reason or "stop",
            queue_ms=1000 * (dispatched - arrival) + engine_queue_ms,
            ttft_ms=1000 * ((first_token_at or done) - arrival),
            total_ms=1000 * (done - arrival),
            prompt=prompt,
            attempts=attempt,
        )
        yield answer
