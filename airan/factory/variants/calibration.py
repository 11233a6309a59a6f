"""Calibration and held-out text from the radio simulator.

Every variant is calibrated on what it will be asked at a site: simulated
controller queries (questions + KPI context) rendered into the model's own
chat prompt with `airan.core.prompting.build_messages`, half in diagnosis mode,
half free text, each followed by the parent's own answer as vLLM serves it
(greedy; diagnoses under the JSON schema). The answers matter: statistics
taken on prompts alone never see the model writing a JSON diagnosis, and a
pruned model calibrated that way kept its prompt perplexity but degenerated
inside the JSON answer. (transformers' generate cannot constrain to the
schema, and unconstrained the parent answers diagnoses in prose.)
The held-out set comes from a different simulated city (another seed), so
perplexity after pruning is not measured on the text the scores saw.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from airan.core.diagnosis import DIAGNOSIS_MAX_TOKENS, diagnosis_schema
from airan.core.prompting import build_messages
from airan.core.query import Query, query_from_fields
from sims.events import random_events
from sims.queries import QueryParams
from sims.simulate import SimConfig, Simulator, run
from sims.timefmt import parse_start
from sims.topology import generate_topology

# the simulated period and city; fixed so a seed names one calibration set
SIM_SITES = 8
SIM_DURATION_S = 6 * 3600.0
SIM_INTERVAL_S = 60.0
SIM_EVENTS = 24
SIM_START = "2025-06-02T06:00:00"
HELDOUT_SEED_OFFSET = 10_000
CALIBRATION_VERSION = "sims-prompts-answers-v3"
# answer budgets of the parent's answers, per mode (diagnosis: the serving default)
ANSWER_TOKENS = {"diagnosis": DIAGNOSIS_MAX_TOKENS, "free_text": 96}


@dataclass(frozen=True)
class CalibrationSet:
    """Token ids of rendered prompts (+ answers); `loss_start[i]` is where the user turn begins."""

    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    loss_start: tuple[int, ...]
    modes: tuple[str, ...]
    cells: tuple[tuple[str, ...], ...]  # cells each prompt's diagnosis may name
    seed: int
    split: str
    max_tokens: int
    answer_tokens: int = 0  # tokens of the parent's answers included (0: prompts only)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def sha256(self) -> str:
        """Identity of the data (texts, truncation and token ids), recorded in manifests."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"version": CALIBRATION_VERSION, "max_tokens": self.max_tokens}).encode())
        for text, ids in zip(self.texts, self.token_ids):
            digest.update(text.encode())
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def describe(self) -> dict:
        return {
            "source": "sims",
            "version": CALIBRATION_VERSION,
            "split": self.split,
            "seed": self.seed,
            "items": len(self.texts),
            "tokens": self.n_tokens,
            "max_tokens_per_item": self.max_tokens,
            "answer_tokens": self.answer_tokens,
            "sha256": self.sha256(),
        }


@lru_cache(maxsize=4)
def simulated_queries(seed: int) -> tuple:
    """All queries of one simulated city and period, in a seeded random order."""
    topology = generate_topology(SIM_SITES, seed=seed)
    events = random_events(topology, SIM_DURATION_S, SIM_EVENTS, seed=seed)
    config = SimConfig(
        duration_s=SIM_DURATION_S,
        interval_s=SIM_INTERVAL_S,
        seed=seed,
        start=parse_start(SIM_START),
        queries=QueryParams(summary_every_s=900.0, ops_per_hour=30.0),
    )
    queries = run(Simulator(topology, events, config)).queries
    order = np.random.default_rng([seed, 7]).permutation(len(queries))
    t0 = config.start.timestamp()
    return tuple((queries[i], t0) for i in order)


def _as_airan_query(q, t0: float, mode: str) -> Query:
    """A simulator query as the server's core would see it (KPI times are offsets from `t0`)."""
    kpis = ((k["name"], float(k["value"]), k["unit"], k["cell_id"], t0 + float(k["t_s"])) for k in q.kpi_context)
    return query_from_fields(q.question, q.query_id, q.controller_id, q.site_ids, q.cell_ids, kpis, mode=mode)


def _ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def calibration_set(tokenizer, n_items: int, seed: int = 0, *, split: str = "calib",
                    max_tokens: int = 1024) -> CalibrationSet:  # fmt: skip
    """`n_items` simulator prompts rendered with `tokenizer`'s chat template.

    split "calib" uses the simulator seed `seed`; "heldout" another city
    (seed + HELDOUT_SEED_OFFSET). Prompts are cut to `max_tokens` from the
    end of the system turn on, keeping the question-specific part.
    """
    if split not in ("calib", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    if n_items < 1:
        raise ValueError("n_items must be >= 1")
    sim_seed = seed + (HELDOUT_SEED_OFFSET if split == "heldout" else 0)
    texts, token_ids, starts, modes, cells = [], [], [], [], []
    round_ = 0
    while len(texts) < n_items:  # bounded: each round adds a whole simulated city's queries
        if round_ > 16:
            raise RuntimeError("the simulator produced too few queries for the calibration set")
        for q, t0 in simulated_queries(sim_seed + 100 * round_):
            if len(texts) == n_items:
                break
            mode = "diagnosis" if len(texts) % 2 == 0 else "free_text"
            query = _as_airan_query(q, t0, mode)
            messages = build_messages(query)
            ids = _ids(tokenizer, messages, generation_prompt=True)
            system_ids = _ids(tokenizer, messages[:1], generation_prompt=False)
            # the system turn is identical in every prompt: it says nothing about a model's
            # grasp of KPI text, so losses start after it (when it is a real prefix)
            start = len(system_ids) if ids[: len(system_ids)] == system_ids else 1
            start = min(start, max_tokens - 2)
            ids = ids[:max_tokens]
            texts.append(tokenizer.decode(ids))
            token_ids.append(tuple(ids))
            starts.append(max(1, start))
            modes.append(mode)
            cells.append(tuple(query.context_cells))
        round_ += 1
    return CalibrationSet(tuple(texts), tuple(token_ids), tuple(starts), tuple(modes), tuple(cells), seed,
                          split, max_tokens)  # fmt: skip


def with_parent_answers(datasets: list[CalibrationSet], parent: Path, cache_dir: Path | None = None, *,
                        seed: int = 0, show_progress: bool = True) -> list[CalibrationSet]:  # fmt: skip
    """Each set with every prompt followed by the parent's answer, generated by vLLM.

    Answers are kept as JSON in `cache_dir` (named by the parent's weights hash
    prefix the caller folds into the directory and by each set's hash): they
    depend only on the parent and the prompts, so every variant reuses them.
    One engine serves all the sets that are not cached yet.
    """
    from transformers import AutoTokenizer

    def cache_file(data: CalibrationSet) -> Path | None:
        return cache_dir / f"answers-{data.sha256()[:24]}.json" if cache_dir is not None else None

    answers: list[list[list[int]] | None] = []
    for data in datasets:
        file, found = cache_file(data), None
        if file is not None and file.is_file():
            try:
                found = json.loads(file.read_text())["answers"]
            except (OSError, ValueError, KeyError):
                found = None
            if found is not None and len(found) != len(data.token_ids):
                found = None
        answers.append(found)
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        merged = _concat([datasets[i] for i in missing])
        generated = _vllm_answers(parent, merged, seed, show_progress)
        for i in missing:
            n = len(datasets[i].token_ids)
            answers[i], generated = generated[:n], generated[n:]
            if (file := cache_file(datasets[i])) is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_text(json.dumps({"answers": answers[i]}))
                os.replace(tmp, file)
    tokenizer = AutoTokenizer.from_pretrained(str(parent))
    out = []
    for data, found in zip(datasets, answers):
        token_ids = tuple(tuple(ids) + tuple(a) for ids, a in zip(data.token_ids, found))
        texts = tuple(tokenizer.decode(ids) for ids in token_ids)
        out.append(dataclasses.replace(data, texts=texts, token_ids=token_ids,
                                       answer_tokens=sum(map(len, found))))  # fmt: skip
    return out


def _concat(datasets: list[CalibrationSet]) -> CalibrationSet:
    first = datasets[0]
    return dataclasses.replace(
        first, **{f: tuple(x for d in datasets for x in getattr(d, f))
                  for f in ("texts", "token_ids", "loss_start", "modes", "cells")},
        max_tokens=max(d.max_tokens for d in datasets),
    )  # fmt: skip


def _vllm_answers(parent: Path, data: CalibrationSet, seed: int, show_progress: bool) -> list[list[int]]:
    """Greedy answers of the parent served by vLLM, with the serving engine's decoding settings."""
    # the build prints its own progress; vLLM's INFO lines (also from its engine process) would bury it
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams
    from vllm.config import StructuredOutputsConfig
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(
        model=str(parent), tokenizer=str(parent), dtype="auto", max_model_len=data.max_tokens,
        # one sequence at a time: in a continuous batch the float sums depend on which requests
        # share a step, and two batched runs flipped a greedy token late in one answer
        max_num_seqs=1, enforce_eager=True, kv_cache_memory_bytes=1 << 30, seed=seed,
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
    )  # fmt: skip
    try:
        params = []
        for ids, mode, cells in zip(data.token_ids, data.modes, data.cells):
            schema = diagnosis_schema(list(cells)) if mode == "diagnosis" else None
            params.append(SamplingParams(
                max_tokens=max(1, min(ANSWER_TOKENS[mode], data.max_tokens - len(ids))), temperature=0.0,
                structured_outputs=StructuredOutputsParams(json=schema) if schema else None,
            ))  # fmt: skip
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in data.token_ids], params,
                            use_tqdm=show_progress)  # fmt: skip
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()


def perplexity(model, data: CalibrationSet) -> float:
    """Perplexity of `model` on `data` from the user turn on (question, KPIs and any answer)."""
    import math

    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, start in zip(data.token_ids, data.loss_start):
            ids_t = torch.tensor([list(ids)])
            logits = model(ids_t).logits[0, start - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            targets = ids_t[0, start:]
            nll -= float(logp.gather(1, targets[:, None]).double().sum())
            count += len(targets)
    return math.exp(nll / count)
