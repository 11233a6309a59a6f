"""Training pairs for free-text answers grounded in the knowledge base, mixed into the NetOps adapter's data.

Questions come from the TRAIN template pool (`airan.evaluation.qa.train_questions`: every aspect of
every passage in several wordings, plus topics the base does not hold), never from the evaluation's
pool. Each pair is what the served model must learn: the prompt is exactly the one the gateway
renders for the controller's free-text request (proto round trip, retrieval, token budget:
`served_qa_query` + `PromptRenderer.render`), and the target is the reference answer for the
passages that prompt shows (`airan.evaluation.qa.reference_answer`): the passage's own facts with
its id cited, or "The context does not cover this." when the passage holding the answer was not
retrieved (or the question is unanswerable), so the model learns to say so instead of inventing.

The pairs are `netops_data.Example`s (label `QA`, loss on the target and `<|im_end|>` only), the
format the LoRA pipeline (`airan.factory.variants.lora`) trains on: one adapter serves both modes.
`qa_split` holds out whole question groups (every wording of one passage's aspect, or of one
unanswerable topic) as DEV items for model selection (`qa_dev_scores`); the evaluation set
(`airan.evaluation.qa.eval_set`) is never read for training or selection.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from airan.core.knowledge import KnowledgeBase, packaged_knowledge
from airan.core.retrieval import NOT_COVERED, cited_ids, strip_citations
from airan.evaluation.qa import (
    QA_SEED, QAItem, eval_set, invented, reference_answer, says_not_covered, states, train_questions,
)  # fmt: skip
from airan.evaluation.qa_runner import QA_MAX_TOKENS, served_qa_query
from airan.factory.variants import netops_data as D
from airan.factory.variants.netops_data import MAX_MODEL_LEN

QA_LABEL = "QA"
QA_SPLIT_SEED = QA_SEED + 2
# DEV answers are decoded greedily up to this many tokens (the key facts come first in a grounded answer;
# the served limit QA_MAX_TOKENS costs a third more per DEV check)
DEV_MAX_NEW_TOKENS = 48


def knowledge_sha256(kb: KnowledgeBase) -> str:
    """A digest of the passages (ids and text): an adapter build depends on the base it learnt from."""
    digest = hashlib.sha256()
    for p in kb.passages:
        digest.update(p.id.encode() + b"\0" + p.text.encode() + b"\0")
    return digest.hexdigest()


def qa_split(kb: KnowledgeBase, per_passage: int, n_train: int, n_dev: int,
             seed: int = QA_SPLIT_SEED) -> tuple[list[QAItem], list[QAItem]]:  # fmt: skip
    """(training, DEV) questions from the TRAIN wording pool (`train_questions(kb, per_passage)`).

    The pool asks each aspect of each passage (and each unanswerable topic) `per_passage` times in
    consecutive items: a group. `n_dev` whole groups (a fifth of them unanswerable topics) are held out
    and their first wording is a DEV item, so DEV asks about facts training never states; training
    takes `n_train` items of the other groups in a seeded order. No question is an evaluation
    question (checked). Deterministic for the knowledge base and the arguments."""
    if per_passage < 1 or n_train < 0 or n_dev < 0:
        raise ValueError("per_passage must be >= 1, n_train and n_dev >= 0")
    return _qa_split(kb, per_passage, n_train, n_dev, seed)


@lru_cache(maxsize=8)
def _qa_split(kb: KnowledgeBase, per_passage: int, n_train: int, n_dev: int, seed: int):
    pool = train_questions(kb, per_passage)
    groups = [pool[i : i + per_passage] for i in range(0, len(pool), per_passage)]
    for g in groups:
        if len({(i.aspect, i.passage_ids, i.facts) for i in g}) != 1:
            raise AssertionError(f"question group {g[0].item_id} mixes aspects: the pool's layout changed")
    rng = random.Random(seed)
    refusals = [k for k, g in enumerate(groups) if not g[0].answerable]
    grounded = [k for k, g in enumerate(groups) if g[0].answerable]
    n_refusal = min(len(refusals), n_dev // 5 if n_dev >= 5 else 0)
    held = set(rng.sample(refusals, n_refusal)) | set(rng.sample(grounded, min(len(grounded), n_dev - n_refusal)))
    dev = [groups[k][0] for k in sorted(held)]
    rest = [i for k, g in enumerate(groups) if k not in held for i in g]
    rng.shuffle(rest)
    if n_train > len(rest):
        raise ValueError(f"{n_train} QA training items asked, the pool holds {len(rest)} outside DEV "
                         f"(per_passage={per_passage})")  # fmt: skip
    train = rest[:n_train]
    clash = {i.question for i in train + dev} & {i.question for i in eval_set(kb)}
    if clash:
        raise AssertionError(f"{len(clash)} training question(s) are evaluation questions, e.g. {sorted(clash)[0]!r}")
    return train, dev


def build_qa_example(renderer, item: QAItem, kb: KnowledgeBase) -> D.Example:
    query = served_qa_query(item, retrieval=True)
    prompt = renderer.render(query, MAX_MODEL_LEN - QA_MAX_TOKENS)
    shown = tuple(c.passage_id for c in prompt.passages)
    target = reference_answer(item, kb, shown)
    tok = renderer.tokenizer
    ids = list(tok(target, add_special_tokens=False)["input_ids"])[: QA_MAX_TOKENS - 1]
    ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    return D.Example(item.item_id, QA_LABEL, (), (), False, shown, tuple(prompt.token_ids) + tuple(ids),
                     len(prompt.token_ids), target)  # fmt: skip


def build_qa_examples(renderer, per_passage: int = 3, kb: KnowledgeBase | None = None,
                      items: Sequence[QAItem] | None = None) -> list[D.Example]:  # fmt: skip
    kb = kb or packaged_knowledge()
    items = items if items is not None else train_questions(kb, per_passage)
    return [build_qa_example(renderer, item, kb) for item in items]


def qa_dev_scores(answers: Sequence[str], items: Sequence[QAItem], examples: Sequence[D.Example],
                  kb: KnowledgeBase) -> dict:  # fmt: skip
    """DEV scores of greedy QA answers against each item's reference (`examples[k].target`): where the
    reference answers from a shown passage, the share of the item's key facts the answer states; where
    it says the context does not cover the question (unanswerable, or the passage was not retrieved),
    1 if the answer declines. `qa_score` is their mean over items; citation precision and invented
    names as the evaluation counts them."""
    known = kb.known_names()
    per_item, recall, refusals, cited_ok, cited_all, names = [], [], [], 0, 0, 0
    for text, item, ex in zip(answers, items, examples, strict=True):
        names += len(invented(text, item.question, known))
        if ex.target == NOT_COVERED:
            ok = float(says_not_covered(text))
            refusals.append(ok)
        else:
            body = strip_citations(text)
            ok = float(np.mean([states(body, f) for f in item.facts]))
            recall.append(ok)
            for pid in cited_ids(text):
                p = kb.get(pid)
                cited_all += 1
                cited_ok += p is not None and any(states(p.text, f) for f in item.facts)
        per_item.append(ok)
    return {
        "qa_score": round(float(np.mean(per_item)), 4) if per_item else 0.0,
        "key_fact_recall": round(float(np.mean(recall)), 4) if recall else None,
        "refusal_accuracy": round(float(np.mean(refusals)), 4) if refusals else None,
        "citation_precision": round(cited_ok / cited_all, 4) if cited_all else None,
        "invented_names": names,
        "items": len(per_item),
    }


def write_dataset(out, parent, n_train: int, n_dev: int, near_rt_share: float = D.NEAR_RT_SHARE,
                  show_progress: bool = False, qa_per_passage: int = 0, qa_train_items: int = 0,
                  qa_dev_items: int = 0) -> dict:  # fmt: skip
    """The adapter's whole dataset as the build makes it: the diagnosis splits (`netops_data.write_dataset`)
    and, with `qa_per_passage`, the free-text pairs `qa_train.jsonl` and `qa_dev.jsonl` (question,
    aspect, key facts, passages shown, prompt text, target); the manifest's `data_sha256` covers both,
    as the adapter's manifest records it."""
    from airan.core.prompting import PromptRenderer
    from airan.core.retrieval import FREE_TEXT_PROMPT_VERSION

    more, facts = [], {}
    if qa_per_passage:
        kb = packaged_knowledge()
        renderer = PromptRenderer(parent)
        facts = {"free_text_prompt_version": FREE_TEXT_PROMPT_VERSION, "knowledge_sha256": knowledge_sha256(kb),
                 "qa_per_passage": qa_per_passage}  # fmt: skip
        for split, items in zip(("qa_train", "qa_dev"), qa_split(kb, qa_per_passage, qa_train_items, qa_dev_items)):
            examples = build_qa_examples(renderer, kb=kb, items=items)
            rows = [{"item_id": ex.item_id, "question": item.question, "aspect": item.aspect, "facts": list(item.facts),
                     "shown": list(ex.citable), "prompt": renderer.tokenizer.decode(ex.input_ids[: ex.n_prompt]),
                     "target": ex.target} for item, ex in zip(items, examples)]  # fmt: skip
            more.append((split, examples, rows))
            facts[f"{split}_counts"] = describe_qa(examples)
    return D.write_dataset(out, parent, n_train, n_dev, near_rt_share, show_progress, more=more, more_facts=facts)


def describe_qa(examples: Sequence[D.Example]) -> dict:
    """Counts for a manifest: pairs, refusals, targets that cite, token sizes."""
    n = max(1, len(examples))
    return {
        "pairs": len(examples),
        "refusals": sum(e.target == NOT_COVERED for e in examples),
        "citing": sum("[" in e.target for e in examples),
        "prompt_tokens_mean": round(sum(e.n_prompt for e in examples) / n, 1),
        "target_tokens": sum(len(e.input_ids) - e.n_prompt for e in examples),
    }
