"""Run the QA set through the real gRPC path, method by method (`airan eval qa`).

A method is a served model asked with or without knowledge retrieval: `base` (the served base
model, no passages: what the model knows by itself), `base+retrieval`, and `<model>+retrieval`
for each trained model given. Every question goes client -> gRPC -> gateway (retrieval, prompt,
route) -> Ray replica -> engine as a free-text request, exactly as a controller's would; methods
run one after the other, never together, so their latencies compare. An error is an answer too
(scored as wrong, counted).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from airan.client import AsyncAiranClient, build_request
from airan.config import AiranConfig
from airan.core.knowledge import KnowledgeBase
from airan.core.retrieval import FREE_TEXT_PROMPT_VERSION
from airan.evaluation.qa import QAAnswer, QAItem, QAScores, score

QA_MAX_TOKENS = 64
CONTROLLER = "eval-qa"


@dataclass(frozen=True)
class QAMethod:
    label: str
    model: str  # "" = the server's default model
    retrieval: bool


def methods_for(base: str, trained: Sequence[str] = ()) -> list[QAMethod]:
    return [QAMethod("base", base, False), QAMethod("base+retrieval", base, True),
            *(QAMethod(f"{m}+retrieval", m, True) for m in trained)]  # fmt: skip


def qa_request(item: QAItem, retrieval: bool = True, model: str = "", max_tokens: int = QA_MAX_TOKENS,
               priority: str = "non_rt"):  # fmt: skip
    """The free-text request a controller sends with this question (no request_id: no idempotency cache)."""
    return build_request(item.question, priority=priority, max_tokens=max_tokens, controller_id=CONTROLLER,
                         model=model, retrieval=retrieval)  # fmt: skip


def served_qa_query(item: QAItem, retrieval: bool = True, max_tokens: int = QA_MAX_TOKENS):
    """The `Query` the gateway builds from `qa_request(item)` (proto round trip, validation): what a
    model is trained on must be what the server renders."""
    from airan.config import LimitsConfig
    from airan.core.query import validate_query
    from airan.serving.api.convert import query_from_proto

    query = query_from_proto(qa_request(item, retrieval, max_tokens=max_tokens), time.monotonic(), None)
    return validate_query(query, LimitsConfig(), (), time.monotonic())


async def ask_qa(address: str, items: Sequence[QAItem], method: QAMethod, *, concurrency: int = 1,
                 timeout_s: float = 120.0, max_tokens: int = QA_MAX_TOKENS,
                 on_done: Callable[[QAAnswer], None] | None = None) -> list[QAAnswer]:  # fmt: skip
    """Answers in item order; at most `concurrency` in flight; latency is what the client waited."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    gate = asyncio.Semaphore(concurrency)

    async def one(client: AsyncAiranClient, item: QAItem) -> QAAnswer:
        async with gate:
            t0 = time.perf_counter()
            try:
                r = await client.ask(qa_request(item, method.retrieval, method.model, max_tokens), timeout_s=timeout_s)
                answer = QAAnswer(item.item_id, r.text, 1000 * (time.perf_counter() - t0),
                                  tuple(c.passage_id for c in r.citations), r.citations_dropped,
                                  tuple(r.prompt.passage_ids), completion_tokens=r.completion_tokens,
                                  unverified_names=tuple(r.unverified_names))  # fmt: skip
            except Exception as e:  # noqa: BLE001 - every failure is scored, none dropped
                code = getattr(e, "code", lambda: None)()
                detail = getattr(e, "details", lambda: str(e))() or ""
                answer = QAAnswer(item.item_id, "", 1000 * (time.perf_counter() - t0),
                                  error=f"{code.name if code else type(e).__name__}: {detail[:200]}")  # fmt: skip
        if on_done is not None:
            on_done(answer)
        return answer

    async with AsyncAiranClient(address) as client:
        return list(await asyncio.gather(*(one(client, i) for i in items)))


def subset(items: Sequence[QAItem], limit: int | None) -> list[QAItem]:
    """Every k-th item, so a bounded run keeps the set's mix of aspects and unanswerable questions."""
    if not limit or limit >= len(items):
        return list(items)
    step = len(items) / limit
    return [items[int(k * step)] for k in range(limit)]


@dataclass
class QAEvaluation:
    meta: dict
    items: list[QAItem]
    answers: dict[str, list[QAAnswer]]
    scores: dict[str, QAScores]

    def summary(self) -> dict:
        return {**self.meta, "n": len(self.items), "methods": {m: asdict(s) for m, s in self.scores.items()}}

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        summary = out / "summary.json"
        summary.write_text(json.dumps(self.summary(), indent=2) + "\n")
        answers = out / "answers.jsonl"
        by_id = {i.item_id: i for i in self.items}
        with answers.open("w") as f:
            for method, rows in self.answers.items():
                for a in rows:
                    f.write(json.dumps({"method": method, **asdict(by_id[a.item_id]), **asdict(a)}) + "\n")
        return [summary, answers]


async def evaluate_qa(items: Sequence[QAItem], methods: Sequence[QAMethod], kb: KnowledgeBase, *,
                      address: str | None = None, config: AiranConfig | None = None, concurrency: int = 1,
                      timeout_s: float = 120.0, max_tokens: int = QA_MAX_TOKENS, progress: bool = True) -> QAEvaluation:  # fmt: skip
    """Every method on every item, at the control plane at `address` or on a LocalStack of `config`
    (default: one site serving the methods' models, airan.evaluation.runner.stack_config)."""
    from airan.evaluation.runner import git_commit, machine_facts, stack_config

    if address is None:
        from airan.stack import LocalStack

        config = config or stack_config(list(dict.fromkeys(m.model for m in methods)))
        async with LocalStack(config) as plane:
            return await evaluate_qa(items, methods, kb, address=plane.address, concurrency=concurrency,
                                     timeout_s=timeout_s, max_tokens=max_tokens, progress=progress)  # fmt: skip
    from tqdm import tqdm

    answers, scores, wall = {}, {}, {}
    for m in methods:
        bar = tqdm(total=len(items), desc=m.label, unit="q", disable=not progress, leave=True)
        t0 = time.perf_counter()
        answers[m.label] = await ask_qa(address, items, m, concurrency=concurrency, timeout_s=timeout_s,
                                        max_tokens=max_tokens, on_done=lambda _: bar.update())  # fmt: skip
        wall[m.label] = round(time.perf_counter() - t0, 2)
        bar.close()
        scores[m.label] = score(items, answers[m.label], kb)
    meta = {
        "machine": machine_facts(), "git_commit": git_commit(), "prompt_version": FREE_TEXT_PROMPT_VERSION,
        "knowledge_passages": len(kb), "max_tokens": max_tokens, "concurrency": concurrency,
        "methods_run": [asdict(m) for m in methods], "wall_s": wall,
    }  # fmt: skip
    return QAEvaluation(meta, list(items), answers, scores)


COLUMNS = (
    ("key-fact recall", "key_fact_recall"), ("citation precision", "citation_precision"),
    ("cited", "citation_rate"), ("invented names", "invented_names"), ("unflagged", "invented_unflagged"), ("refusal acc.", "refusal_accuracy"),
    ("false refusals", "false_refusals"), ("errors", "errors"), ("p50 ms", "latency_p50_ms"), ("p95 ms", "latency_p95_ms"),
)  # fmt: skip


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) and v <= 1.0 else f"{v:,.0f}" if isinstance(v, float) else str(v)


def markdown_table(evaluation: QAEvaluation) -> str:
    head = "| method | n | " + " | ".join(c for c, _ in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for method, s in evaluation.scores.items():
        rows.append(f"| {method} | {s.n} | " + " | ".join(_cell(getattr(s, k)) for _, k in COLUMNS) + " |")
    return "\n".join(rows)


def rescore(directory: Path, kb: KnowledgeBase) -> dict:
    """Score a run's answers.jsonl again with the current scorers (e.g. after a scorer fix) and rewrite
    its summary.json; the answers themselves are never changed. Returns the new summary."""
    from airan.evaluation.qa import QAItem

    rows = [json.loads(line) for line in (directory / "answers.jsonl").read_text().splitlines() if line.strip()]
    summary_path = directory / "summary.json"
    summary = json.loads(summary_path.read_text())
    item_fields = set(QAItem.__dataclass_fields__)
    answer_fields = set(QAAnswer.__dataclass_fields__)
    for method in summary["methods"]:
        mine = [r for r in rows if r["method"] == method]
        items = [QAItem(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items() if k in item_fields})
                 for r in mine]  # fmt: skip
        answers = [QAAnswer(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items() if k in answer_fields})
                   for r in mine]  # fmt: skip
        summary["methods"][method] = asdict(score(items, answers, kb))
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
