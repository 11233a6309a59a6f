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
from dataclasses import dataclass, field, replace
from typing import Protocol

from pydantic import TypeAdapter, ValidationError

from airan.config import AiranConfig
from airan.serving.engine.protocol import (
    EngineDeadError,
    GenerationChunk,
    GenerationParams,
    ReplicaUnavailableError,
    RequestFailedError,
)
from airan.core.admission import RateModel, ReplicaQueue, Ticket, engine_priority
from airan.core.answer_length import AnswerLengths
from airan.core.detector import Detector
from airan.core.diagnosis import CompactAnswer, Diagnosis, InvalidDiagnosis, compact_text
from airan.core.prompting import DiagnosisContext, RenderedPrompt, diagnosis_context
from airan.core.retrieval import Citation, parse_citations, unverified_names
from airan.errors import AiranError, ErrorKind
from airan.core.query import Query, validate_query
from airan.core.routing import Priority, ReplicaView, Router, RoutingContext, RoutingRequest
from airan.core.routing.router import RoutingDecision
from airan.core.routing.table import ReplicaTable
from airan.serving import metrics
from airan.serving.cluster.cpucap import PERIOD_US
from airan.serving.sites import SiteRegistry
from airan.serving.state import InFlightRecord, StoredAnswer, StateStore

CAP_PERIOD_S = PERIOD_US / 1e6  # the period a radio-first CPU cap is enforced over


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
    # who answered: "model", or "detector" when no replica could in time and the request opted in;
    # the site the request named first, why it was served elsewhere (or by the detector), and what
    # admission predicted on the serving replica against the time the deadline left (ms; 0 = none)
    answered_by: str = "model"
    requested_site_id: str = ""
    routing_note: str = ""
    predicted_ms: float = 0.0
    allowed_ms: float = 0.0
    citations: tuple[Citation, ...] = ()  # free text: the shown passages the answer cites
    citations_dropped: int = 0  # cited ids that were not shown for this request
    # free text: names in the text neither the knowledge base nor the prompt holds (flagged, not rewritten)
    unverified_names: tuple[str, ...] = ()
    # times the stream moved on to another replica because the one answering died mid-answer
    migrations: int = 0


_ANSWER_JSON = TypeAdapter(Answer)


def encode_answer(answer: Answer) -> str:
    """An answer as the state store keeps it: JSON, with only the prompt facts a response shows
    (version, context rows, passages), not its token ids or the names it knows (most of its size)."""
    if answer.prompt is not None:
        answer = replace(answer, prompt=shown_prompt(answer.prompt))
    return _ANSWER_JSON.dump_json(answer).decode()


def shown_prompt(prompt: RenderedPrompt) -> RenderedPrompt:
    """What of a rendered prompt a response carries (api/convert.py's PromptInfo)."""
    return RenderedPrompt([], prompt.context_rows, prompt.context_rows_dropped, prompt.version,
                          passages=prompt.passages)  # fmt: skip


def decode_answer(payload: str) -> Answer:
    """The answer `encode_answer` wrote; ValueError when this version cannot read it."""
    try:
        return _ANSWER_JSON.validate_json(payload)
    except ValidationError as e:
        raise ValueError(f"stored answer not readable: {e.error_count()} error(s)") from e


@dataclass
class _Sent:
    """What one answer has produced so far, across the replicas it ran on: a replica that dies
    after text has left goes on elsewhere from exactly these tokens."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    delivered: bool = False  # text left for the caller: a failure must continue, not start over
    resumable: bool = True  # every token came with its id (the engine says which tokens it sent)
    first_token_at: float | None = None
    queue_ms: float = 0.0
    migrations: list[str] = field(default_factory=list)  # "replica at site died after n tokens"

    def add(self, chunk: GenerationChunk, resumed_from: int) -> None:
        self.token_ids.extend(chunk.token_ids)
        if resumed_from + chunk.completion_tokens != len(self.token_ids):
            self.resumable = False
        if chunk.text_delta:
            self.text.append(chunk.text_delta)

    def start_over(self) -> None:
        """Nothing reached the caller: the next replica answers from the beginning."""
        self.token_ids.clear()
        self.text.clear()
        self.resumable, self.first_token_at, self.queue_ms = True, None, 0.0


class _Refused(AiranError):
    """Admission or a replica's queue turned the request away before any replica answered it
    (the fast detector may answer instead, where the request opted in)."""


class _ReplicaBusy(Exception):
    """This replica's queue has no room for the request; the next ranked replica may."""


class _Preemption:
    """How a running BEST_EFFORT answer is stopped for a higher class: `why` is set, and the timeout
    its stream is awaiting the next chunk under (if any) fires now."""

    __slots__ = ("why", "timeout")

    def __init__(self) -> None:
        self.why = ""
        self.timeout: asyncio.Timeout | None = None


class _IdempotencyCache:
    """Answers by (controller_id, request_id), so a controller's retry gets the same answer once and
    no other caller can read it by guessing its key (the controller is the authenticated caller
    under auth mode mtls or token, airan/serving/api/interceptors.py)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.completed: OrderedDict[tuple[str, str], Answer] = OrderedDict()
        self.in_flight: dict[tuple[str, str], asyncio.Future] = {}

    def store(self, answer: Answer, controller_id: str) -> None:
        if self.size:
            self.completed[(controller_id, answer.request_id)] = answer
            while len(self.completed) > self.size:
                self.completed.popitem(last=False)

    def key_in_flight(self, request_id: str) -> bool:
        """Whether any caller's call with this key runs now (it is also the engine's request id)."""
        return any(key == request_id for _, key in self.in_flight)


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
        store: StateStore | None = None,
    ) -> None:
        self.config = config
        # idempotent answers and in-flight ids are written here, so a restarted control plane answers
        # a retry and knows which calls a crash cut off
        self.store = store
        self.detector = detector  # evidence the model sees; None: the prompt carries the KPI evidence only
        self.pool = pool
        self.sites = sites
        self.renderers = renderers
        self.router = router or Router.from_config(config.router)
        self.clock = clock
        self.in_flight: Counter[str] = Counter()  # requests each replica's engine is running for us
        self._cache = _IdempotencyCache(config.limits.idempotency_cache_size)
        self._one_off_in_flight: set[str] = set()  # ids of calls without a client key, while they run
        # admission: per-replica queues and measured speed; the routing table's admission columns
        # are rewritten from them whenever a queue changes, never while a request is routed
        admission = config.router.admission
        one_at_a_time = config.engine.kind == "llamacpp"
        self._slots = admission.slots or (1 if one_at_a_time else config.engine.max_num_seqs)
        self._bounds = {p: getattr(admission.queue_bounds, p.name.lower()) for p in Priority}
        self._queues: dict[str, ReplicaQueue] = {}
        self._rates: dict[str, RateModel] = {}
        self._model_rates: dict[str, RateModel] = {}  # every replica of a model, pooled
        self._answer_lengths = AnswerLengths()  # a diagnosis's tokens, per model and bound
        self._model_of: dict[str, str] = {}
        self._waiters: dict[Ticket, asyncio.Future] = {}
        self._preemptions: dict[Ticket, _Preemption] = {}  # running tickets a higher class may stop
        self._table: ReplicaTable | None = None
        self._table_key: list | None = None
        self._views_version: object = None  # the pool's views_version the table was checked at

    # -- views ---------------------------------------------------------------
    def replica_views(self) -> list[ReplicaView]:
        """Each replica with its requests in flight: running on its engine or waiting in its queue."""
        return [replace(v, in_flight=self._in_flight(v.replica_id)) for v in self.pool.views()]

    def _in_flight(self, replica_id: str) -> int:
        queue = self._queues.get(replica_id)
        return self.in_flight[replica_id] + (len(queue.waiting) if queue else 0)

    def site_in_flight(self, site_id: str) -> int:
        return sum(self._in_flight(v.replica_id) for v in self.pool.views() if v.site_id == site_id)

    def replica_node_ids(self) -> dict[str, str]:
        """Replica id -> node id, for operators' views (empty string until placed)."""
        return dict(self.pool.node_ids())

    def remembers(self, idempotency_key: str, controller_id: str = "") -> bool:
        """Whether an answer for this controller's key is kept or being computed (a retry would share it)."""
        scoped = (controller_id, idempotency_key)
        return scoped in self._cache.completed or scoped in self._cache.in_flight

    # -- entry points ----------------------------------------------------------
    async def ask(self, query: Query, arrival: float | None = None, *, request_id: str = "") -> Answer:
        """Unary: the whole answer; a retried idempotency key shares the first call's answer."""
        key = query.request_id
        if key and (query.controller_id, key) in self._cache.in_flight:
            return await asyncio.shield(self._cache.in_flight[(query.controller_id, key)])
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
        scoped = (query.controller_id, key)
        if key and scoped in self._cache.completed:
            yield self._cache.completed[scoped]
            return
        if key and self._cache.key_in_flight(key):  # this caller's, or another's (engine ids are unique)
            raise AiranError(
                ErrorKind.ALREADY_EXISTS,
                f"request_id '{key}' is already being answered; wait for it or use a new request_id",
            )
        if not key:  # a one-off call: nothing to remember
            # its id (a caller's x-request-id, or minted) is also the engine's request id: one call at a time
            if request_id in self._one_off_in_flight or self._cache.key_in_flight(request_id):
                raise AiranError(ErrorKind.ALREADY_EXISTS, f"request id '{request_id}' names a call still in "
                                 "flight: give each call its own x-request-id")  # fmt: skip
            self._one_off_in_flight.add(request_id)
            try:
                async for event in self._tracked(replace(query, request_id=request_id), arrival):
                    yield event
            finally:
                self._one_off_in_flight.discard(request_id)
            return
        if key in self._one_off_in_flight:
            raise AiranError(ErrorKind.ALREADY_EXISTS,
                             f"request_id '{key}' names a call still in flight (its x-request-id): use a new request_id")  # fmt: skip
        # claim the key so a concurrent retry waits for this answer instead of recomputing it
        future = asyncio.get_running_loop().create_future()
        self._cache.in_flight[scoped] = future
        try:
            async for event in self._tracked(query, arrival, idempotent=True):
                if isinstance(event, Answer):
                    self._remember(query, event)
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
            self._cache.in_flight.pop(scoped, None)

    # -- what outlives the process (the state store) -------------------------------
    def _remember(self, query: Query, answer: Answer) -> None:
        self._cache.store(answer, query.controller_id)
        if self.store is not None and self._cache.size:
            self.store.put_answer(StoredAnswer(query.controller_id, query.request_id, encode_answer(answer), time.time()))

    def restore_answers(self, stored: list[StoredAnswer]) -> int:
        """Answers a previous control plane gave to idempotent requests (oldest first); a retry gets
        them again. Returns how many could be read (one this version cannot read is recomputed)."""
        restored = 0
        for record in stored[-self._cache.size:] if self._cache.size else ():
            try:
                answer = decode_answer(record.payload)
            except ValueError:
                continue
            self._cache.store(answer, record.controller_id)
            restored += 1
        return restored

    async def _tracked(self, query: Query, arrival: float | None, idempotent: bool = False,
                       ) -> AsyncIterator[Delta | Answer]:  # fmt: skip
        """`_run`, with the call's id in the state store while it runs: what a crash leaves there
        was cut off, and the next control plane says so."""
        if self.store is None:
            async for event in self._run(query, arrival):
                yield event
            return
        self.store.begin(InFlightRecord(query.request_id, query.controller_id, idempotent, time.time()))
        try:
            async for event in self._run(query, arrival):
                yield event
        finally:
            self.store.end(query.request_id)

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
        if query.detector_fallback and query.mode != "diagnosis":
            raise AiranError(
                ErrorKind.INVALID_ARGUMENT,
                "detector_fallback answers a diagnosis: ask with response_mode DIAGNOSIS, or leave it unset",
            )
        query = replace(query, model=model)
        spec = self.config.model(model)
        max_len = self.config.model(spec.parent).max_model_len if spec.is_adapter else spec.max_model_len
        lora = model if spec.is_adapter else None

        def prepare() -> tuple[DiagnosisContext | None, RenderedPrompt, int]:
            evidence = diagnosis_context(query, self.detector) if query.mode == "diagnosis" else None
            prompt = self.renderers[model].render(query, max_len - query.max_tokens, evidence)
            return evidence, prompt, self._answer_prior(query, evidence)

        # the detector and the tokenizer are CPU work: off the event loop, so other calls keep moving
        diagnosis, prompt, prior = await asyncio.to_thread(prepare)
        query = replace(query, answer_tokens_prior=prior)
        fallback = self.config.router.admission.detector_fallback if query.detector_fallback is None \
            else query.detector_fallback  # fmt: skip
        try:
            async for event in self._answer(query, prompt, diagnosis, lora, arrival):
                yield event
        except _Refused as refused:
            if not (fallback and diagnosis is not None and diagnosis.detector is not None):
                raise AiranError(refused.kind, refused.message) from None
            yield self._detector_answer(query, prompt, diagnosis, arrival, refused)

    async def _answer(
        self, query: Query, prompt: RenderedPrompt, diagnosis: DiagnosisContext | None, lora: str | None,
        arrival: float,
    ) -> AsyncIterator[Delta | Answer]:  # fmt: skip
        table = self._routing_table()
        request = RoutingRequest(
            request_id=query.request_id,
            model=query.model,
            controller_id=query.controller_id,
            site_ids=query.site_ids,
            priority=query.priority,
            prompt_tokens=len(prompt.token_ids),
            max_tokens=query.max_tokens,
            deadline=query.deadline,
            expected_tokens=self._expected_tokens(query),
            allowed_sites=query.allowed_sites,
        )
        ctx = RoutingContext(request, table.sites, self.sites.min_ai_headroom, now=self.clock())
        decision = self.router.choose(ctx, table, limit=self.MAX_ATTEMPTS)
        if not decision.tiers:
            kind = ErrorKind[decision.rejection_kind]
            prefix = "no replica can take this query" if kind is ErrorKind.UNAVAILABLE else "refused at admission"
            raise _Refused(kind, f"{prefix}: {decision.rejection}")
        note = decision.placement_note  # now, while the table holds what the decision saw

        decision = replace(decision, explain_placement=lambda: note)
        priority = engine_priority(query.priority, query.deadline)
        if query.mode != "diagnosis":
            params = GenerationParams(max_tokens=query.max_tokens, temperature=query.temperature, lora=lora,
                                      priority=priority)  # fmt: skip
            async for event in self._dispatch(query, decision, prompt, params, arrival):
                if isinstance(event, Answer):
                    cited, dropped = parse_citations(event.text, prompt.passages)
                    event = replace(event, citations=cited, citations_dropped=dropped,
                                    unverified_names=unverified_names(event.text, prompt.known_names))  # fmt: skip
                yield event
            return

        # Diagnosis: decode under the request's compact grammar, check every rule, retry once (sampling,
        # so the retry can differ) while the deadline allows; never return an invalid one.
        grammar = diagnosis.grammar(prompt.citable_kpis)
        params = GenerationParams(query.max_tokens, query.temperature, grammar=grammar, lora=lora, priority=priority)
        problems = []
        for attempt in (1, 2):
            answer = None
            async for event in self._dispatch(query, decision, prompt, params, arrival, attempt):
                if isinstance(event, Answer):
                    answer = event  # diagnosis mode streams no text deltas: only checked answers leave
            self._answer_lengths.observe((query.model, query.max_tokens), answer.completion_tokens)
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
            f"model '{query.model}' gave no valid diagnosis in {len(problems)} attempt(s) "
            f"({'; '.join(problems)}); retry, or ask in free-text mode",
        )

    def _detector_answer(
        self, query: Query, prompt: RenderedPrompt, diagnosis: DiagnosisContext, arrival: float, refused: _Refused
    ) -> Answer:
        """The fast detector's diagnosis, at once, for a request no replica could answer in time."""
        d = diagnosis.detector
        cells = tuple(c for c in d.affected_cells if c in diagnosis.aliases)
        parsed = diagnosis.diagnosis(CompactAnswer(d.cause, cells, ()))
        elapsed_ms = 1000 * (self.clock() - arrival)
        return Answer(
            request_id=query.request_id,
            text=compact_text(d.cause, cells, diagnosis.aliases),
            prompt_tokens=len(prompt.token_ids),
            completion_tokens=0,
            replica_id="",
            site_id="",
            model=query.model,
            finish_reason="stop",
            queue_ms=0.0,
            ttft_ms=elapsed_ms,
            total_ms=elapsed_ms,
            prompt=prompt,
            diagnosis=parsed,
            answered_by="detector",
            requested_site_id=query.site_ids[0] if query.site_ids else "",
            routing_note=f"answered by the fast detector ({refused.kind.value}: {refused.message})",
            allowed_ms=0.0 if query.deadline is None else max(0.0, 1000 * (query.deadline - arrival)),
        )

    async def _dispatch(
        self,
        query: Query,
        decision: RoutingDecision,
        prompt: RenderedPrompt,
        params: GenerationParams,
        arrival: float,
        attempt: int = 1,
    ) -> AsyncIterator[Delta | Answer]:
        """Run on the best replica; fail over to the next if one fails before any text has left
        or has no room in its queue. A replica that dies after text has left: the answer goes on at
        another replica, which prefills the prompt plus the tokens already sent and decodes on from
        there, so the caller gets no token twice and none lost (at most
        `reliability.max_stream_resumes` times, never past the deadline). Constrained answers
        (diagnoses) leave whole, so theirs start over instead."""
        failures: list[str] = []
        busy: list[str] = []
        sent = _Sent()
        lost_ids: set[str] = set()
        candidates = list(decision.ranked[: self.MAX_ATTEMPTS])
        while candidates:
            replica = candidates.pop(0)
            try:
                async for event in self._on_replica(query, replica, prompt, params, arrival, attempt, sent):
                    if isinstance(event, Answer):
                        event = replace(event, **self._placement(query, decision, replica, failures + busy, arrival,
                                                                 sent))  # fmt: skip
                    else:
                        sent.delivered = True
                    yield event
                return
            except _ReplicaBusy as e:
                busy.append(str(e))
            except (EngineDeadError, RequestFailedError, ReplicaUnavailableError) as e:
                lost = isinstance(e, (EngineDeadError, ReplicaUnavailableError))
                if lost:
                    self.pool.mark_failed(replica.replica_id, str(e))
                    lost_ids.add(replica.replica_id)
                constrained = params.grammar is not None or bool(params.json_schema)
                if not sent.delivered or constrained:
                    sent.start_over()
                    failures.append(f"{replica.replica_id}: {e}")
                    continue
                where = f"replica {replica.replica_id} at {replica.site_id} failed mid-answer ({e}) after " \
                        f"{len(sent.token_ids)} tokens"  # fmt: skip
                if not lost:  # the request failed, not the replica: it would fail again elsewhere
                    raise AiranError(ErrorKind.UNAVAILABLE, f"{where}; retry the query") from e
                self._check_resumable(query, sent, where)
                sent.migrations.append(f"{replica.replica_id} at {replica.site_id} died after "
                                       f"{len(sent.token_ids)} tokens")  # fmt: skip
                metrics.stream_migrated("replica_lost")
                candidates = self._resume_candidates(query, prompt, sent, lost_ids, where)
        if busy and not failures:
            raise _Refused(ErrorKind.RESOURCE_EXHAUSTED,
                           f"no room at the chosen replicas ({'; '.join(busy)}): retry later")  # fmt: skip
        raise AiranError(ErrorKind.UNAVAILABLE, "every chosen replica failed: " + "; ".join(failures + busy))

    def _check_resumable(self, query: Query, sent: _Sent, where: str) -> None:
        """Raise if an answer cut off after text left cannot go on at another replica."""
        if len(sent.migrations) >= self.config.reliability.max_stream_resumes:
            raise AiranError(ErrorKind.UNAVAILABLE, f"{where}; it had moved {len(sent.migrations)} time(s) already "
                             "(reliability.max_stream_resumes): retry the query")  # fmt: skip
        if not sent.resumable:
            raise AiranError(ErrorKind.UNAVAILABLE, f"{where}; its engine did not say which tokens it sent, so it "
                             "cannot go on elsewhere: retry the query")  # fmt: skip
        if len(sent.token_ids) >= query.max_tokens:
            raise AiranError(ErrorKind.UNAVAILABLE, f"{where}, at its last token: retry the query")
        if query.deadline is not None and self.clock() >= query.deadline:
            raise AiranError(ErrorKind.DEADLINE_EXCEEDED, f"{where}; the deadline has passed")

    def _resume_candidates(self, query: Query, prompt: RenderedPrompt, sent: _Sent, lost_ids: set[str],
                           where: str) -> list[ReplicaView]:  # fmt: skip
        """Replicas that may take the rest of an answer (routed afresh: prompt + what was sent, the
        tokens left, the same deadline), best first."""
        left = query.max_tokens - len(sent.token_ids)
        request = RoutingRequest(
            request_id=query.request_id, model=query.model, controller_id=query.controller_id,
            site_ids=query.site_ids, priority=query.priority,
            prompt_tokens=len(prompt.token_ids) + len(sent.token_ids), max_tokens=left, deadline=query.deadline,
            expected_tokens=left, allowed_sites=query.allowed_sites,
        )  # fmt: skip
        table = self._routing_table()
        ctx = RoutingContext(request, table.sites, self.sites.min_ai_headroom, now=self.clock())
        decision = self.router.choose(ctx, table, limit=self.MAX_ATTEMPTS)
        ranked = [r for r in decision.ranked if r.replica_id not in lost_ids]
        if not ranked:
            kind = ErrorKind[decision.rejection_kind] if decision.rejection else ErrorKind.UNAVAILABLE
            raise AiranError(kind, f"{where}; no replica can take the rest of it "
                             f"({decision.rejection or 'none left'}): retry the query")  # fmt: skip
        return ranked

    def _placement(
        self, query: Query, decision: RoutingDecision, replica: ReplicaView, passed_over: list[str], arrival: float,
        sent: _Sent | None = None,
    ) -> dict:  # fmt: skip
        """Where the answer came from and why, for the response."""
        note = decision.placement_note
        if passed_over:
            note = f"served by {replica.replica_id} at {replica.site_id} after {'; '.join(passed_over)}"
        if sent is not None and sent.migrations:
            note = f"went on at {replica.replica_id} at {replica.site_id} after {'; '.join(sent.migrations)}" \
                   + (f" (earlier: {'; '.join(passed_over)})" if passed_over else "")  # fmt: skip
        predicted = decision.predicted_s.get(replica.replica_id)
        return dict(
            requested_site_id=query.site_ids[0] if query.site_ids else "",
            routing_note=note,
            predicted_ms=0.0 if predicted is None else 1000 * predicted,
            allowed_ms=0.0 if query.deadline is None else max(0.0, 1000 * (query.deadline - arrival)),
        )

    async def _on_replica(
        self,
        query: Query,
        replica: ReplicaView,
        prompt: RenderedPrompt,
        params: GenerationParams,
        arrival: float,
        attempt: int,
        sent: _Sent,
    ) -> AsyncIterator[Delta | Answer]:
        rid = replica.replica_id
        client = self.pool.client(rid)
        # a retry is a new engine request; the id the caller sees stays the same
        engine_request_id = query.request_id if attempt == 1 else f"{query.request_id}#{attempt}"
        if sent.migrations:
            engine_request_id += f"~{len(sent.migrations)}"
        prompt_tokens = len(prompt.token_ids) + len(sent.token_ids)
        expected_tokens = max(1, self._expected_tokens(query) - len(sent.token_ids))  # what is left of it
        queue, rates = self._queue(rid), self._speed_of(rid)
        table = self._routing_table()
        network_s = 2.0 * float(table.latency_s(query.controller_id)[table.index[rid]]) if rid in table.index else 0.0
        share, margin = self._share_of(rid), self.config.router.admission.margin
        ticket = Ticket(
            engine_request_id, query.priority, query.deadline,
            rates.service_s(prompt_tokens, expected_tokens, min(len(queue.running) + 1, queue.slots), share),
            network_s, prompt_tokens, expected_tokens,
        )  # fmt: skip

        def fits(batch: int) -> bool:  # in time running in a batch of this size, by the deadline filter's rule
            return query.deadline is None or margin * (network_s + rates.service_s(
                prompt_tokens, expected_tokens, batch, share)) <= query.deadline - self.clock()  # fmt: skip

        offer = queue.offer(ticket, self.clock(), fits)
        for shed in offer.shed:
            self._shed(shed, rid, query.priority)
        for victim in offer.preempted:
            self._preempt(victim, rid, query.priority)
        if not offer.accepted:
            raise _ReplicaBusy(offer.refusal)
        metrics.admitted(query.priority.value, replica.site_id)
        self._queue_changed(rid)
        preemption = self._preemptions[ticket] = _Preemption()
        try:
            if offer.queued:
                await self._wait_for_slot(queue, ticket, arrival)
            async for event in self._generate(query, replica, client, engine_request_id, prompt, params,
                                              arrival, attempt, sent, preemption):  # fmt: skip
                yield event
        finally:
            self._preemptions.pop(ticket, None)
            self._leave(queue, ticket)

    async def _generate(
        self, query: Query, replica: ReplicaView, client: ReplicaClient, engine_request_id: str,
        prompt: RenderedPrompt, params: GenerationParams, arrival: float, attempt: int, sent: _Sent,
        preemption: _Preemption,
    ) -> AsyncIterator[Delta | Answer]:  # fmt: skip
        dispatched = self.clock()
        first_token_at = None
        engine_queue_ms = 0.0
        last: GenerationChunk | None = None
        self.in_flight[replica.replica_id] += 1
        batch_at_start = self.in_flight[replica.replica_id]
        # going on from a replica that died: the tokens already sent are part of the prompt now
        resumed_from = len(sent.token_ids)
        if resumed_from:
            prompt_ids = list(prompt.token_ids) + sent.token_ids
            params = replace(params, max_tokens=params.max_tokens - resumed_from)
        else:
            prompt_ids = prompt.token_ids
        chunks = aiter(client.generate(prompt_ids, params, engine_request_id))
        try:
            while True:
                if preemption.why:
                    raise TimeoutError
                # the deadline bounds the replica's work, not the caller's time at `yield`
                remaining = None if query.deadline is None else query.deadline - self.clock()
                try:
                    async with asyncio.timeout(remaining) as preemption.timeout:
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                finally:
                    preemption.timeout = None
                if first_token_at is None:
                    first_token_at = self.clock()
                    engine_queue_ms = chunk.engine_queue_ms or 0.0
                    if sent.first_token_at is None:
                        sent.first_token_at = first_token_at
                        sent.queue_ms = 1000 * (dispatched - arrival) + engine_queue_ms
                last = chunk
                sent.add(chunk, resumed_from)
                if chunk.text_delta:
                    yield Delta(chunk.text_delta)
        except TimeoutError:
            tokens = len(sent.token_ids)
            if preemption.why:
                raise AiranError(ErrorKind.RESOURCE_EXHAUSTED, f"{preemption.why} ({tokens} tokens had been sent)",
                                 "preempted") from None  # fmt: skip
            raise AiranError(
                ErrorKind.DEADLINE_EXCEEDED,
                f"deadline passed {1000 * (self.clock() - arrival):.0f} ms after arrival while "
                f"replica {replica.replica_id} at {replica.site_id} was answering ({tokens} tokens so far)",
            ) from None
        finally:
            batch = (batch_at_start + self.in_flight[replica.replica_id]) / 2
            self.in_flight[replica.replica_id] -= 1
            if self.in_flight[replica.replica_id] <= 0:
                del self.in_flight[replica.replica_id]
            await chunks.aclose()  # aborts the engine request if it is still running
        if last is None or not last.finished:
            raise ReplicaUnavailableError(f"replica {replica.replica_id} ended the stream without finishing")
        done = self.clock()
        # the replica's speed, from the engine's own timestamps where it sends them (learnt after the
        # answer, so routing only ever reads the smoothed figures)
        first = first_token_at or done
        prefill_s = last.prefill_ms / 1000 if last.prefill_ms is not None \
            else max(0.0, first - dispatched - engine_queue_ms / 1000)  # fmt: skip
        decode_s = last.decode_ms / 1000 if last.decode_ms is not None else done - first
        self._learn(replica, last.prompt_tokens, prefill_s, last.completion_tokens, decode_s, batch,
                    self._share_of(replica.replica_id))  # fmt: skip
        answer = Answer(
            request_id=query.request_id,
            text="".join(sent.text),
            prompt_tokens=len(prompt.token_ids),
            completion_tokens=resumed_from + last.completion_tokens,
            replica_id=replica.replica_id,
            site_id=replica.site_id,
            model=query.model,
            finish_reason=last.finish_reason or "stop",
            queue_ms=sent.queue_ms,
            ttft_ms=1000 * ((sent.first_token_at or done) - arrival),
            total_ms=1000 * (done - arrival),
            prompt=prompt,
            attempts=attempt,
            migrations=len(sent.migrations),
        )
        yield answer

    # -- admission state (changes here, read by the router) -----------------------------
    def _expected_tokens(self, query: Query) -> int:
        """The tokens admission predicts the answer at: a diagnosis's learnt length (its grammar
        bounds it, and it runs steady per model; until learnt, the prior from the detector's answer
        when there is one), the request's max_tokens for free text."""
        if query.mode != "diagnosis":
            return query.max_tokens
        return self._answer_lengths.expected((query.model, query.max_tokens), query.answer_tokens_prior
                                             or query.max_tokens)  # fmt: skip

    def _answer_prior(self, query: Query, diagnosis: DiagnosisContext | None) -> int:
        """A brief (NEAR_RT) diagnosis is a cause and cells, the form the detector's own answer takes:
        its tokens plus two (the end token, a cell more) until the model's answers are learnt; 0 where
        there is no detector, the answer may cite KPIs too, or the lengths are learnt (no tokenizing)."""
        if diagnosis is None or diagnosis.detector is None or query.priority is not Priority.NEAR_RT \
                or self._answer_lengths.learnt((query.model, query.max_tokens)):  # fmt: skip
            return 0
        d = diagnosis.detector
        cells = tuple(c for c in d.affected_cells if c in diagnosis.aliases)
        text = compact_text(d.cause, cells, diagnosis.aliases)
        return min(query.max_tokens, self.renderers[query.model].count_tokens(text) + 2)

    def _queue(self, replica_id: str) -> ReplicaQueue:
        queue = self._queues.get(replica_id)
        if queue is None:
            admission = self.config.router.admission
            queue = self._queues[replica_id] = ReplicaQueue(replica_id, self._slots, self._bounds,
                                                            admission.max_waiting, admission.preempt_best_effort)  # fmt: skip
        return queue

    def _new_rates(self) -> RateModel:
        a = self.config.router.admission
        return RateModel(a.smoothing, a.prior_prefill_tok_s, a.prior_decode_tok_s, a.batch_slowdown)

    def _rates_of(self, replica_id: str) -> RateModel:
        """What this replica's own answers measured (the priors until its first)."""
        rates = self._rates.get(replica_id)
        if rates is None:
            rates = self._rates[replica_id] = self._new_rates()
        return rates

    def _speed_of(self, replica_id: str) -> RateModel:
        """The speed admission predicts with: the replica's own measurements, or, until it has
        answered, what the replicas serving the same model measured (a replica predicted on a
        pessimistic prior would never be chosen, so never measured), or the priors."""
        own = self._rates_of(replica_id)
        if own.decode_samples:
            return own
        shared = self._model_rates.get(self._model_of.get(replica_id, ""))
        return shared if shared is not None and shared.decode_samples else own

    def _share_of(self, replica_id: str) -> float:
        """The share of its full CPU a replica's radio-first cap leaves it now (1: uncapped)."""
        table = self._table
        i = table.index.get(replica_id) if table is not None else None
        return 1.0 if i is None else table.views[i].cpu_share

    def _learn(self, replica: ReplicaView, prompt_tokens: int, prefill_s: float, completion_tokens: int,
               decode_s: float, batch: float, share: float = 1.0) -> None:  # fmt: skip
        self._rates_of(replica.replica_id).observe(prompt_tokens, prefill_s, completion_tokens, decode_s, batch, share)
        shared = self._model_rates.setdefault(replica.model, self._new_rates())
        shared.observe(prompt_tokens, prefill_s, completion_tokens, decode_s, batch, share)
        for rid, model in self._model_of.items():  # replicas that predict with the shared figures
            if model == replica.model and rid != replica.replica_id and not self._rates_of(rid).decode_samples:
                self._queue_changed(rid)

    def _routing_table(self) -> ReplicaTable:
        """The router's columns, rebuilt only when the replica set or a site changed."""
        version = getattr(self.pool, "views_version", None)  # O(1) where the pool counts its changes
        unchanged = version is not None and self._table is not None and version == self._views_version
        views = self._table_key if unchanged else self.pool.views()
        self._views_version = version
        if not unchanged and (self._table is None or views != self._table_key):  # a view is replaced on change
            self._table, self._table_key = ReplicaTable(views, self.sites.views()), views
            self._model_of = {v.replica_id: v.model for v in views}
            for v in views:
                self._queue_changed(v.replica_id)
        else:
            sites = self.sites.views()
            if sites != self._table.sites:
                self._table.set_sites(sites)
        return self._table

    def _queue_changed(self, replica_id: str) -> None:
        """Rewrite one replica's admission columns from its queue and measured speed."""
        if self._table is None or replica_id not in self._table.index:
            return
        queue, rates = self._queue(replica_id), self._speed_of(replica_id)
        share = self._share_of(replica_id)  # radio first: a capped replica runs that much slower
        queue.reprice(rates, share)
        running = len(queue.running)
        # a capped replica that has used its quota waits out the rest of the cap's period before it runs
        # again, so an answer may start up to that much later than CPU time / share says
        throttled_s = (1.0 - share) * CAP_PERIOD_S if share < 1.0 else 0.0
        # a running request past its predicted end still holds its slot for at least a token
        starts = queue.start_times(self.clock(), rates.decode_s_per_token(max(running, 1), share))
        self._table.set_admission(
            replica_id,
            rates.prefill_s(share),
            # per class: the batch a new request would join (smaller where it would preempt BEST_EFFORT)
            [rates.decode_s_per_token(min(n + 1, queue.slots), share) for n in queue.holding_counts()],
            rates.decode_s_per_token(1, share),
            [t + throttled_s for t in starts],
        )
        self._table.set_load(replica_id, len(queue))

    async def _wait_for_slot(self, queue: ReplicaQueue, ticket: Ticket, arrival: float) -> None:
        """Wait until the queue starts the ticket; give up at the last moment it could still answer
        in time (DEADLINE_EXCEEDED then, not at the deadline), or when it is shed (RESOURCE_EXHAUSTED)."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = future
        latest = ticket.latest_start
        try:
            async with asyncio.timeout(None if latest is None else max(0.0, latest - self.clock())):
                await future
        except TimeoutError:
            if ticket.started_at is not None:
                return  # it started in the same instant
            ahead = queue.ahead_of(ticket)
            queue.withdraw(ticket)
            now = self.clock()
            raise _Refused(
                ErrorKind.DEADLINE_EXCEEDED,
                f"still waiting for a slot at {queue.replica_id} behind {ahead} request(s) "
                f"{1000 * (now - arrival):.0f} ms after arrival; it needs about "
                f"{1000 * (ticket.service_s + ticket.network_s):.0f} ms there and "
                f"{1000 * (ticket.deadline - now):.0f} ms are left, so it was dropped before its deadline",
            ) from None
        finally:
            self._waiters.pop(ticket, None)

    def _shed(self, ticket: Ticket, replica_id: str, for_priority: Priority) -> None:
        future = self._waiters.get(ticket)
        if future is not None and not future.done():
            future.set_exception(_Refused(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"shed from {replica_id}'s full queue to make room for a {for_priority.name} request: retry later",
            ))  # fmt: skip

    def _preempt(self, ticket: Ticket, replica_id: str, for_priority: Priority) -> None:
        """Stop a running BEST_EFFORT answer so a higher class fits (admission chose it)."""
        preemption = self._preemptions.get(ticket)
        if preemption is None or preemption.why:
            return
        preemption.why = (f"preempted at {replica_id} to make room for a {for_priority.name} request "
                          "(BEST_EFFORT yields first under load): retry later")  # fmt: skip
        if preemption.timeout is not None:
            preemption.timeout.reschedule(asyncio.get_running_loop().time())

    def _leave(self, queue: ReplicaQueue, ticket: Ticket) -> None:
        """The ticket is done (answered, failed, cancelled or dropped): free its slot or place."""
        if ticket.started_at is not None:
            for started in queue.finish(ticket, self.clock()):
                future = self._waiters.get(started)
                if future is not None and not future.done():
                    future.set_result(None)
        else:
            queue.withdraw(ticket)
        self._queue_changed(queue.replica_id)
