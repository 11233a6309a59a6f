"""Streams survive a replica's death (gateway with in-process replicas): the answer goes on at another
replica from the tokens already sent, so the caller sees no token lost and none twice."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from airan.config import parse_config
from airan.core.prompting import PromptRenderer
from airan.core.query import Query
from airan.errors import AiranError, ErrorKind
from airan.factory.tiny import ensure_tiny_model
from airan.serving.engine.protocol import (
    EngineDeadError,
    GenerationChunk,
    ReplicaUnavailableError,
    RequestFailedError,
)
from airan.serving.gateway import Answer, Delta, Gateway
from airan.serving.sites import SiteRegistry
from fakes import FakePool, call_id

THREE_SITES = {
    "sites": [{"id": f"bs-0{i}", "latency_ms": {"x": i}} for i in (1, 2, 3)],
    "models": [{"name": "m", "source": "tiny-random", "max_model_len": 1024}],
    "replicas": [{"site": f"bs-0{i}", "model": "m"} for i in (1, 2, 3)],
    "limits": {"max_tokens_limit": 900},
}


def config(**reliability):
    return parse_config({**THREE_SITES, "reliability": reliability})


class GreedyReplica:
    """A deterministic 'model': each next token is a function of the whole sequence so far (prompt and
    answer), as greedy decoding is, so an answer continued elsewhere from the same tokens must go on
    exactly as the uninterrupted one. Dies (raises `dies_with`) after `dies_after` tokens of a call."""

    def __init__(self, dies_after: int | None = None, dies_with: Exception | None = None, send_ids: bool = True,
                 delay: float = 0.0) -> None:  # fmt: skip
        self.dies_after, self.dies_with, self.send_ids, self.delay = dies_after, dies_with, send_ids, delay
        self.calls: list[tuple[list[int], int]] = []  # (prompt ids, max_tokens) per call

    @staticmethod
    def next_token(seq: list[int]) -> int:
        return (sum(seq[-3:]) * 31 + len(seq)) % 997 + 3

    async def generate(self, prompt_ids, params, request_id):
        seq = list(prompt_ids)
        self.calls.append((list(prompt_ids), params.max_tokens))
        for i in range(params.max_tokens):
            if self.dies_after is not None and i == self.dies_after:
                raise self.dies_with or ReplicaUnavailableError("replica actor is gone: SIGKILL")
            await asyncio.sleep(self.delay)
            tok = self.next_token(seq)
            seq.append(tok)
            last = i == params.max_tokens - 1
            yield GenerationChunk(f"t{tok} ", i + 1, len(prompt_ids), last, "length" if last else None,
                                  token_ids=(tok,) if self.send_ids else ())  # fmt: skip

    async def abort(self, request_id):
        pass


@pytest.fixture(scope="module")
def renderer():
    return PromptRenderer(ensure_tiny_model())


def make(renderer, replicas, cfg=None):
    cfg = cfg or config()
    pool = FakePool(replicas)
    return Gateway(cfg, pool, SiteRegistry(cfg.sites, 0.0), {"m": renderer}), pool


def q(**kw):
    return Query(question="why is the cell slow", request_id="", model="m", max_tokens=kw.pop("max_tokens", 12), **kw)


async def run(gw, query):
    events = [e async for e in gw.stream(query, request_id=call_id())]
    deltas = [e.text for e in events if isinstance(e, Delta)]
    [answer] = [e for e in events if isinstance(e, Answer)]
    assert events[-1] is answer
    return "".join(deltas), answer


def migrations_counted() -> float:
    return REGISTRY.get_sample_value("airan_stream_migrations_total", {"reason": "replica_lost"}) or 0.0


async def uninterrupted(renderer, query):
    gw, _ = make(renderer, {"r1": ("bs-01", GreedyReplica())})
    return await run(gw, query)


@pytest.mark.parametrize("dies_with", [ReplicaUnavailableError("actor died"), EngineDeadError("engine exited")])
async def test_a_stream_goes_on_elsewhere_with_no_token_lost_or_repeated(renderer, dies_with):
    query = q(site_ids=("bs-01",), max_tokens=12)
    want_text, want = await uninterrupted(renderer, query)
    dying, rescuer = GreedyReplica(dies_after=5, dies_with=dies_with), GreedyReplica()
    gw, pool = make(renderer, {"r1": ("bs-01", dying), "r2": ("bs-02", rescuer), "r3": ("bs-03", GreedyReplica())})
    before = migrations_counted()

    text, answer = await run(gw, query)

    assert text == answer.text == want_text and answer.completion_tokens == want.completion_tokens == 12
    assert answer.replica_id == "r2" and answer.migrations == 1 and migrations_counted() == before + 1
    assert "r1 at bs-01 died after 5 tokens" in answer.routing_note
    assert answer.prompt_tokens == want.prompt_tokens  # the caller's prompt, not the re-prefilled one
    assert "r1" in pool.failed  # out of routing at once
    [(prompt_ids, max_tokens)] = rescuer.calls
    assert prompt_ids[: want.prompt_tokens] == dying.calls[0][0] and len(prompt_ids) == want.prompt_tokens + 5
    assert max_tokens == 7
    assert gw.in_flight == {}


async def test_a_stream_goes_on_only_inside_its_callers_scope(renderer):
    query = q(controller_id="x", max_tokens=12, allowed_sites=frozenset({"bs-02", "bs-03"}))
    want_text, _ = await uninterrupted(renderer, replace(query, allowed_sites=None))
    near = GreedyReplica()  # bs-01 is the nearest site to x, but outside the scope
    gw, _ = make(renderer, {"r1": ("bs-02", GreedyReplica(dies_after=5)), "r2": ("bs-01", near),
                            "r3": ("bs-03", GreedyReplica())})  # fmt: skip
    text, answer = await run(gw, query)
    assert text == want_text and answer.replica_id == "r3" and answer.migrations == 1 and near.calls == []
    # with no other replica in its scope, the answer stops instead of going on outside it
    gw, _ = make(renderer, {"r1": ("bs-02", GreedyReplica(dies_after=5)), "r2": ("bs-01", near)})
    with pytest.raises(AiranError) as e:
        await run(gw, replace(query, allowed_sites=frozenset({"bs-02"})))
    assert e.value.kind is ErrorKind.UNAVAILABLE and "no replica can take the rest" in e.value.message
    assert "its caller's scope confines it to sites bs-02" in e.value.message and near.calls == []


async def test_unary_ask_resumes_too(renderer):
    query = q(site_ids=("bs-01",), max_tokens=9)
    want_text, _ = await uninterrupted(renderer, query)
    gw, _ = make(renderer, {"r1": ("bs-01", GreedyReplica(dies_after=3)), "r2": ("bs-02", GreedyReplica())})
    answer = await gw.ask(query, request_id=call_id())
    assert answer.text == want_text and answer.migrations == 1


async def test_a_second_death_moves_it_again_within_the_bound(renderer):
    query = q(site_ids=("bs-01",), max_tokens=12)
    want_text, _ = await uninterrupted(renderer, query)
    gw, _ = make(renderer, {"r1": ("bs-01", GreedyReplica(dies_after=3)), "r2": ("bs-02", GreedyReplica(dies_after=4)),
                            "r3": ("bs-03", GreedyReplica())})  # fmt: skip
    text, answer = await run(gw, query)
    assert text == want_text and answer.migrations == 2 and answer.replica_id == "r3"


async def test_past_max_stream_resumes_the_caller_gets_unavailable(renderer):
    gw, _ = make(renderer, {"r1": ("bs-01", GreedyReplica(dies_after=3)), "r2": ("bs-02", GreedyReplica())},
                 config(max_stream_resumes=0))  # fmt: skip
    sent = []
    with pytest.raises(AiranError) as e:
        async for event in gw.stream(q(site_ids=("bs-01",)), request_id=call_id()):
            sent.append(event)
    assert e.value.kind is ErrorKind.UNAVAILABLE and "max_stream_resumes" in e.value.message
    assert len(sent) == 3 and gw.in_flight == {}


async def test_no_replica_left_to_go_on_at(renderer):
    gw, _ = make(renderer, {"r1": ("bs-01", GreedyReplica(dies_after=3)), "r2": ("bs-02", GreedyReplica(dies_after=2))})
    with pytest.raises(AiranError) as e:
        await gw.ask(q(site_ids=("bs-01",)), request_id=call_id())
    assert e.value.kind is ErrorKind.UNAVAILABLE and "no replica can take the rest" in e.value.message


async def test_an_engine_that_does_not_send_token_ids_cannot_be_resumed(renderer):
    gw, _ = make(renderer, {"r1": ("bs-01", GreedyReplica(dies_after=3, send_ids=False)), "r2": ("bs-02", GreedyReplica())})
    with pytest.raises(AiranError) as e:
        await gw.ask(q(site_ids=("bs-01",)), request_id=call_id())
    assert e.value.kind is ErrorKind.UNAVAILABLE and "did not say which tokens" in e.value.message


async def test_a_request_that_fails_mid_answer_is_not_moved(renderer):
    # the request failed, not the replica: it would fail the same way elsewhere
    rescuer = GreedyReplica()
    gw, pool = make(renderer, {"r1": ("bs-01", GreedyReplica(dies_after=3, dies_with=RequestFailedError("bad"))),
                               "r2": ("bs-02", rescuer)})  # fmt: skip
    with pytest.raises(AiranError) as e:
        await gw.ask(q(site_ids=("bs-01",)), request_id=call_id())
    assert e.value.kind is ErrorKind.UNAVAILABLE and rescuer.calls == [] and pool.failed == {}


async def test_never_past_the_deadline(renderer):
    now = [0.0]
    cfg = config()
    pool = FakePool({"r1": ("bs-01", GreedyReplica(dies_after=3)), "r2": ("bs-02", GreedyReplica())})
    gw = Gateway(cfg, pool, SiteRegistry(cfg.sites, 0.0), {"m": renderer}, clock=lambda: now[0])
    sent = 0
    with pytest.raises(AiranError) as e:
        async for event in gw.stream(q(site_ids=("bs-01",), deadline=5.0), arrival=0.0, request_id=call_id()):
            sent += 1
            if sent == 3:
                now[0] = 6.0  # the deadline passes before the replica dies
    assert e.value.kind is ErrorKind.DEADLINE_EXCEEDED and "deadline has passed" in e.value.message


async def test_a_death_before_any_text_starts_over_and_is_not_a_migration(renderer):
    query = q(site_ids=("bs-01",), max_tokens=6)
    want_text, _ = await uninterrupted(renderer, query)
    gw, _ = make(renderer, {"r1": ("bs-01", GreedyReplica(dies_after=0)), "r2": ("bs-02", GreedyReplica())})
    text, answer = await run(gw, query)
    assert text == want_text and answer.migrations == 0 and "r1" in answer.routing_note
