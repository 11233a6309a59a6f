"""Knowledge retrieval cost: index build, BM25 search, and the free-text prompt render with retrieval
against the same render without it (the baseline), on the QA evaluation questions.

Plain data, no engine: `.venv/bin/python benchmarks/bench_retrieval.py [--tokenizer DIR]` (default: the
prepared SmolLM2's tokenizer, else the tiny model's). Prints a table: median and the min-max of the
per-round medians over the rounds, plus retrieval recall on the QA set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _tokenizer_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    from airan.store.registry import find_prepared_smollm2

    found = find_prepared_smollm2()
    if found is not None:
        return Path(found)
    from airan.factory.tiny import ensure_tiny_model

    return Path(ensure_tiny_model())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", help="a model directory whose tokenizer renders the prompts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    from airan.core.knowledge import load_knowledge

    kb = load_knowledge()
    load_s = time.perf_counter() - t0
    from airan.core.prompting import PromptRenderer
    from airan.core.query import Query
    from airan.core.retrieval import KnowledgeIndex
    from airan.evaluation.qa import eval_set

    items = eval_set(kb)
    renderer = PromptRenderer(_tokenizer_dir(args.tokenizer), KnowledgeIndex(kb))
    rounds: dict[str, list[float]] = {"index build ms": [], "search ms p50": [], "search ms p95": [],
                                      "render ms p50 (retrieval)": [], "render ms p50 (baseline: none)": [],
                                      "render ms p95 (retrieval)": [], "render ms p95 (baseline: none)": []}  # fmt: skip
    tokens = {True: [], False: []}
    for r in range(args.rounds):
        t = time.perf_counter()
        index = KnowledgeIndex(kb)
        rounds["index build ms"].append(1000 * (time.perf_counter() - t))
        renderer.index = index
        search = []
        for item in items:
            t = time.perf_counter()
            index.search(item.question)
            search.append(1000 * (time.perf_counter() - t))
        rounds["search ms p50"].append(float(np.percentile(search, 50)))
        rounds["search ms p95"].append(float(np.percentile(search, 95)))
        order = (True, False) if r % 2 == 0 else (False, True)  # A B, B A
        for retrieval in order:
            times = []
            for item in items:
                q = Query(question=item.question, request_id="b", max_tokens=64, retrieval=retrieval)
                t = time.perf_counter()
                p = renderer.render(q, 2048 - 64)
                times.append(1000 * (time.perf_counter() - t))
                if r == 0:
                    tokens[retrieval].append(len(p.token_ids))
            label = "retrieval" if retrieval else "baseline: none"
            rounds[f"render ms p50 ({label})"].append(float(np.percentile(times, 50)))
            rounds[f"render ms p95 ({label})"].append(float(np.percentile(times, 95)))
    answerable = [i for i in items if i.answerable]
    index = KnowledgeIndex(kb)
    top = {i.item_id: [h.passage.id for h in index.search(i.question, 4)] for i in answerable}
    recall1 = np.mean([top[i.item_id][:1] == [i.passage_ids[0]] for i in answerable])
    recall4 = np.mean([i.passage_ids[0] in top[i.item_id] for i in answerable])

    print(f"knowledge base: {len(kb)} passages, loaded and validated in {1000 * load_s:.0f} ms (imports included); "
          f"{len(items)} QA questions, {args.rounds} rounds, tokenizer {renderer.tokenizer.name_or_path}")  # fmt: skip
    print(f"| measure | median | min-max over rounds |\n|---|---|---|")
    for name, values in rounds.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} |")
    print(f"| prompt tokens p50 (retrieval / none) | {np.median(tokens[True]):.0f} / {np.median(tokens[False]):.0f} | - |")
    print(f"| retrieval recall@1 / @4 ({len(answerable)} answerable) | {recall1:.3f} / {recall4:.3f} | - |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rounds": rounds, "recall_at_1": recall1, "recall_at_4": recall4,
                                        "passages": len(kb), "questions": len(items),
                                        "prompt_tokens_p50": {"retrieval": float(np.median(tokens[True])),
                                                              "none": float(np.median(tokens[False]))}}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
