"""The llama.cpp peer behind the EngineClient seam (optional extra: `pip install -e '.[llamacpp]'`)."""
from __future__ import annotations

import asyncio
import math

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional 'llamacpp' extra")

from airan.core.diagnosis import diagnosis_schema, parse_diagnosis  # noqa: E402
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
    from airan.factory.variants.lora_netops import server_query
    from airan.core.prompting import PromptRenderer

    query = server_query(build_dataset(7, TEST_SEED, "test")[2])
    ids = PromptRenderer(prepare_smollm2(show_progress=False)).render(query, 2048 - 256).token_ids
    return query, list(ids)


async def _collect(engine, ids, params, request_id):
    chunks = [c async for c in engine.generate(ids, params, request_id)]
    return chunks, "".join(c.text_delta for c in chunks)


def test_llamacpp_engine_serves_fixed_length_and_constrained_diagnoses(gguf, prompt):
    query, ids = prompt

    async def main():
        engine = LlamaCppEngine(LlamaCppSettings(gguf))
        assert isinstance(engine, EngineClient)
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
