"""Free-text answers grounded in the knowledge base, through the real stack (Ray site node, vLLM on
CPU, gRPC on 127.0.0.1) on the tiny generated model: retrieval, citations, and `airan eval qa`."""
from __future__ import annotations

import json

import pytest
import pytest_asyncio

from airan.client import AsyncAiranClient, build_request, kpi
from airan.core.knowledge import packaged_knowledge
from airan.core.retrieval import cited_ids, unverified_names
from airan.evaluation.qa import eval_set
from airan.core.prompting import PromptRenderer
from airan.evaluation.qa_runner import evaluate_qa, markdown_table, methods_for, served_qa_query, subset
from airan.store.registry import materialize
from airan.stack import LocalStack
from conftest import prepare_tiny_models, tiny_stack_config

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
QUESTION = "What does RRU.PrbUsedDl measure?"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack():
    # one site, one replica on one thread (a replica asking for more CPUs than its site's node offers never starts)
    config = tiny_stack_config(n_sites=1, engine={"kv_cache_gb": 0.25, "max_num_seqs": 8, "cpu_threads": 1})
    async with LocalStack(prepare_tiny_models(config)) as plane:
        yield plane


async def test_a_kpi_question_is_answered_from_retrieved_passages_with_their_citations_only(stack):
    async with AsyncAiranClient(stack.address) as c:
        request = build_request(QUESTION, max_tokens=48, kpis=[kpi("RRU.PrbUsedDl", 250, "PRBs", "bs-01/c1", 60.0),
                                                                kpi("RRU.PrbUsedDl", 270, "PRBs", "bs-01/c1", 120.0)])  # fmt: skip
        r = await c.ask(request, timeout_s=120)
        shown = list(r.prompt.passage_ids)
        assert r.prompt.prompt_version == "qa-v1" and shown[:2] == ["evidence", "kpi:RRU.PrbUsedDl"]
        cited = [x.passage_id for x in r.citations]
        assert set(cited) <= set(shown) and all(x.title for x in r.citations)
        # every id the text cites is either returned (it was shown) or counted as dropped
        assert len(cited_ids(r.text)) == len(cited) + r.citations_dropped

        chunks = [ch async for ch in c.ask_stream(request, timeout_s=120)]
        final = chunks[-1]
        assert final.final and list(final.prompt.passage_ids) == shown
        text = "".join(ch.text_delta for ch in chunks)
        assert [x.passage_id for x in final.citations] == [i for i in cited_ids(text) if i in shown]
        # flagged names are the answer's own and backed by nothing the server knows (the question aside)
        known = packaged_knowledge().known_names()
        for answer, flagged in ((r.text, r.unverified_names), (text, final.unverified_names)):
            assert set(flagged) <= set(unverified_names(answer, known, QUESTION))

        bare = await c.ask(build_request(QUESTION, max_tokens=8, retrieval=False), timeout_s=120)
        assert list(bare.prompt.passage_ids) == [] and not bare.citations


async def test_airan_eval_qa_runs_every_method_through_grpc(stack, tmp_path):
    kb = packaged_knowledge()
    items = subset(eval_set(kb), 12)
    evaluation = await evaluate_qa(items, methods_for("tiny-llama"), kb, address=stack.address, concurrency=2,
                                   max_tokens=16, progress=False)  # fmt: skip
    assert set(evaluation.scores) == {"base", "base+retrieval"}
    # the passages the server showed are those the gateway's renderer picks for the same request here
    renderer = PromptRenderer(materialize(stack.config.model("tiny-llama")))
    budget = stack.config.model("tiny-llama").max_model_len - 16
    for method, answers in evaluation.answers.items():
        assert len(answers) == 12 and not [a.error for a in answers if a.error]
        retrieval = method != "base"
        for item, a in zip(items, answers):
            prompt = renderer.render(served_qa_query(item, retrieval, max_tokens=16), budget)
            assert a.retrieved == tuple(c.passage_id for c in prompt.passages)
            assert set(a.citations) <= set(a.retrieved)
        if retrieval:  # the passage holding the answer is retrieved (the tiny model's 512-token context may drop it)
            assert sum(i.passage_ids[0] in a.retrieved for i, a in zip(items, answers) if i.answerable) >= 6
    s = evaluation.scores["base+retrieval"]
    assert s.n == 12 and s.n_unanswerable >= 1 and 0 <= s.key_fact_recall <= 1 and s.latency_p95_ms > 0
    paths = evaluation.write(tmp_path)
    summary = json.loads(paths[0].read_text())
    assert summary["n"] == 12 and set(summary["methods"]) == {"base", "base+retrieval"}
    assert len(paths[1].read_text().splitlines()) == 24
    assert "| base+retrieval | 12 |" in markdown_table(evaluation)
