"""In-process fakes of the replica side, shared by the gateway and gRPC-shell tests."""
import asyncio
import itertools

from airan.config import parse_config
from airan.serving.engine.protocol import GenerationChunk
from airan.core.routing import ReplicaState, ReplicaView

# two sites, one tiny-model replica each (the fakes below stand in for the engines)
CONFIG = parse_config(
    {
        "sites": [{"id": "bs-01", "latency_ms": {"x": 1}}, {"id": "bs-02", "latency_ms": {"x": 5}}],
        "models": [{"name": "m", "source": "tiny-random", "max_model_len": 1024}],
        "replicas": [{"site": "bs-01", "model": "m"}, {"site": "bs-02", "model": "m"}],
        "limits": {"max_tokens_limit": 900, "default_max_tokens": 8},
        "radio": {"min_ai_headroom": 0.2},
    }
)

_ids = itertools.count(1)


def call_id() -> str:
    """A fresh per-call id, as the gRPC request-id interceptor gives the gateway."""
    return f"call-{next(_ids)}"


class FakeReplica:
    """Streams `words` one per chunk (or each of `answers` whole, one per call)."""

    def __init__(self, words=("ok",) * 4, delay=0.0, fail_before=None, answers=None):
        self.words, self.delay, self.fail_before = words, delay, fail_before
        self.answers = list(answers or [])
        self.params = []
        self.aborted, self.calls = [], 0
        self.request_ids = []

    async def generate(self, prompt_ids, params, request_id):
        self.calls += 1
        self.params.append(params)
        self.request_ids.append(request_id)  # in the order the engine received them
        finished = False
        try:
            if self.fail_before:
                raise self.fail_before
            words = [self.answers.pop(0)] if self.answers else self.words[: params.max_tokens]
            for i, w in enumerate(words):
                await asyncio.sleep(self.delay)
                last = i == len(words) - 1
                finished = last
                yield GenerationChunk(w + " ", i + 1, len(prompt_ids), last, "length" if last else None, 0.5)
        finally:
            if not finished:
                self.aborted.append(request_id)

    async def abort(self, request_id):
        self.aborted.append(request_id)


class FakePool:
    def __init__(self, replicas):
        self.replicas = replicas  # id -> (site, FakeReplica)
        self.failed = {}

    def views(self):
        return [
            ReplicaView(rid, site, "m", ReplicaState.FAILED if rid in self.failed else ReplicaState.READY)
            for rid, (site, _) in self.replicas.items()
        ]

    def client(self, rid):
        return self.replicas[rid][1]

    def mark_failed(self, rid, reason):
        self.failed[rid] = reason

    def node_ids(self):
        return {rid: f"node-{site}" for rid, (site, _) in self.replicas.items()}


