"""The llama.cpp peer behind the EngineClient seam (optional extra: `pip install -e '.[llamacpp]'`)."""
from __future__ import annotations

import asyncio
import math

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional 'llamacpp' extra")

from airan.config import EngineConfig, ModelSpec, parse_config  # noqa: E402
from airan.core.diagnosis import diagnosis_schema, parse_diagnosis  # noqa: E402
from airan.serving.engine.kinds import build_engine, replica_engine  # noqa: E402
from airan.serving.engine.llamacpp_engine import LlamaCppEngine, LlamaCppSettings  # noqa: E402
from airan.serving.engine.protocol import EngineClient, GenerationParams, RequestFailedError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf():
    from airan.factory.smollm2 import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="module")
def prompt(gguf):
    from airan.evaluation.dataset import TEST_SEED, build_dataset
    from airan.factory.smollm2 import prepare_smollm2
    from airan.evaluation.queries import server_query
    from airan.core.prompting import PromptRenderer

    query = server_query(build_dataset(7, TEST_SEED, "test")[2])
    ids = PromptRenderer(prepare_smollm2(show_progress=False)).render(query, 2048 - 256).token_ids
    return query, list(ids)


async def _collect(engine, ids, params, request_id):
    chunks = [c async for c in engine.generate(ids, params, request_id)]
    return chunks, "".join(c.text_delta for c in chunks)


def test_llamacpp_engine_serves_fixed_length_and_constrained_diagnoses(gguf, prompt):
    query, ids = prompt
    # built as a replica builds it: engine.kind in the config, through the one factory
    config = EngineConfig(kind="llamacpp", gguf_path=gguf)
    spec = replica_engine(config, ModelSpec(name="smollm2", source="smollm2", max_model_len=2048), gguf.parent, (), [0, 1])

    async def main():
        engine = build_engine(spec)
        assert type(engine) is LlamaCppEngine and isinstance(engine, EngineClient)
        assert engine.settings == LlamaCppSettings(gguf.resolve(), n_ctx=2048, n_threads=2)
        await engine.start()
        try:
            chunks, _ = await _collect(engine, ids, GenerationParams(max_tokens=24, ignore_eos=True), "fixed")
            assert chunks[-1].finished and chunks[-1].completion_tokens == 24
            assert chunks[-1].finish_reason == "length" and chunks[-1].prompt_tokens == len(ids)

            schema = diagnosis_schema(list(query.context_cells))
            _, text = await _collect(engine, ids, GenerationParams(max_tokens=160, json_schema=schema), "diag")
            diagnosis = parse_diagnosis(text, list(query.context_cells))
            assert diagnosis.cause and set(diagnosis.affected_cell_ids) <= set(query.context_cells)

            # a consumer that stops early aborts the request; the engine serves the next one
            stream = engine.generate(ids, GenerationParams(max_tokens=200, ignore_eos=True), "early")
            await anext(stream)
            await stream.aclose()
            assert engine.load().running == 0
            chunks, _ = await _collect(engine, ids, GenerationParams(max_tokens=4, ignore_eos=True), "after")
            assert chunks[-1].completion_tokens == 4

            with pytest.raises(RequestFailedError, match="LoRA"):
                await _collect(engine, ids, GenerationParams(max_tokens=4, lora="smollm2-netops-lora"), "lora")
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_llamacpp_prompt_logprobs_give_a_finite_perplexity(gguf, prompt):
    _, ids = prompt

    async def main():
        engine = LlamaCppEngine(LlamaCppSettings(gguf, logits_all=True))
        await engine.start()
        try:
            logprobs = engine.prompt_logprobs(ids[:300])
        finally:
            await engine.shutdown()
        assert len(logprobs) == 299 and all(lp <= 0 for lp in logprobs)
        assert 1 < math.exp(-sum(logprobs) / len(logprobs)) < 100

    asyncio.run(main())


def test_a_stack_with_engine_kind_llamacpp_answers_over_grpc(gguf):
    """engine.kind: llamacpp in the config is all it takes: the replica actor serves the GGUF."""
    from airan.client import AsyncAiranClient, build_request, kpi
    from airan.stack import LocalStack
    from airan.v1 import control_pb2

    config = parse_config({
        "sites": [{"id": "bs-01", "cpus": 2}],
        "models": [{"name": "smollm2-135m-instruct", "source": "smollm2", "max_model_len": 2048}],
        "replicas": [{"site": "bs-01", "model": "smollm2-135m-instruct"}],
        "engine": {"kind": "llamacpp", "gguf_path": str(gguf)},
        "server": {"host": "127.0.0.1", "port": 0, "grace_s": 1},
    })  # fmt: skip

    async def main():
        async with LocalStack(config) as plane, AsyncAiranClient(plane.address) as client:
            replicas = (await client.replicas()).replicas
            assert [r.state for r in replicas] == [control_pb2.REPLICA_READY]
            r = await client.ask(build_request("Why is downlink throughput low?", site_ids=["bs-01"], max_tokens=8,
                                               kpis=[kpi("DRB.UEThpDl", 850.0, "kbit/s", "bs-01/c1")]), timeout_s=120)  # fmt: skip
            assert r.site_id == "bs-01" and r.text and 0 < r.completion_tokens <= 8 and r.prompt_tokens > 20

    asyncio.run(main())
