"""llama.cpp (llama-cpp-python) behind the same EngineClient seam as vLLM.

The on-device peer airan is measured against: it serves the SmolLM2 GGUF as
shipped, one sequence at a time (as llama-cpp-python's own server does, behind
a lock), with prefix reuse between consecutive prompts and GBNF-constrained
JSON for diagnoses. Optional: `pip install 'airan[llamacpp]'` builds it.
Replicas run it with `engine.kind: llamacpp` and `engine.gguf_path` in the config.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from airan.serving.engine.protocol import (
    EngineDeadError,
    EngineLoad,
    EngineUnavailableError,
    GenerationChunk,
    GenerationParams,
    RequestFailedError,
)


@dataclass(frozen=True)
class LlamaCppSettings:
    gguf_path: Path
    n_ctx: int = 2048
    n_threads: int = 2
    n_batch: int = 512
    seed: int = 0
    # logits for every prompt position: only for perplexity (slower prefill)
    logits_all: bool = False


def replica_settings(model, engine, model_path: Path, adapters: tuple[tuple[str, str], ...],
                     cpu_ids: list[int] | None) -> LlamaCppSettings:  # fmt: skip
    """`engine.kind: llamacpp` for `kinds.replica_engine`: the config's GGUF, the model's context,
    one thread per CPU the replica was given. `model_path` (the model's directory) only lends the
    gateway its tokenizer, which is the GGUF's; the config rejects adapters with this kind."""
    if adapters:
        raise ValueError("llama.cpp replicas serve no LoRA adapters")
    if engine.gguf_path is None:
        raise ValueError("engine.kind 'llamacpp' needs engine.gguf_path")
    gguf = Path(engine.gguf_path).expanduser().resolve()
    if not gguf.is_file():
        raise EngineUnavailableError(f"engine.gguf_path {gguf} is not a file: point it at the GGUF of model "
                                     f"'{model.name}' (the same path on every site)")  # fmt: skip
    threads = len(cpu_ids) if cpu_ids else engine.cpu_threads or LlamaCppSettings.n_threads
    return LlamaCppSettings(gguf_path=gguf, n_ctx=model.max_model_len, n_threads=threads, seed=engine.seed)


def replica_env(cpu_ids: list[int] | None) -> dict[str, str]:
    """Environment of a llama.cpp replica actor (ggml's CPU backend threads with OpenMP)."""
    return {"OMP_NUM_THREADS": str(len(cpu_ids))} if cpu_ids else {}


class LlamaCppEngine:
    def __init__(self, settings: LlamaCppSettings) -> None:
        self.settings = settings
        self.max_model_len = settings.n_ctx
        self._llm = None
        self._lock = threading.Lock()  # one sequence at a time
        self._aborted: set[str] = set()
        self._running = 0
        self._waiting = 0

    async def start(self) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise EngineDeadError("llama-cpp-python is not installed: pip install 'airan[llamacpp]'") from e
        s = self.settings
        self._llm = await asyncio.to_thread(
            Llama, model_path=str(s.gguf_path), n_ctx=s.n_ctx, n_threads=s.n_threads, n_threads_batch=s.n_threads,
            n_batch=s.n_batch, seed=s.seed, logits_all=s.logits_all, verbose=False,
        )  # fmt: skip

    def _engine(self):
        if self._llm is None:
            raise EngineDeadError("engine not started")
        return self._llm

    def _grammar(self, params: GenerationParams):
        if params.grammar is None and not params.json_schema:
            return None
        from llama_cpp import LlamaGrammar

        if params.grammar is not None:
            return LlamaGrammar.from_string(params.grammar.gbnf(), verbose=False)
        return LlamaGrammar.from_json_schema(json.dumps(params.json_schema), verbose=False)

    def _run(self, prompt: list[int], params: GenerationParams, request_id: str, emit) -> None:
        """Blocking decode loop (a worker thread); `emit(token_ids_so_far, finished, reason)`."""
        llm = self._engine()
        grammar = self._grammar(params)
        self._waiting += 1
        with self._lock:
            self._waiting -= 1
            self._running += 1
            try:
                ids: list[int] = []
                reason = "length"
                if params.max_tokens > 0:
                    for token in llm.generate(prompt, temp=params.temperature, top_k=1 if params.temperature == 0 else 40,
                                              grammar=grammar, reset=True):  # fmt: skip
                        if request_id in self._aborted:
                            reason = "abort"
                            break
                        if token == llm.token_eos() and not params.ignore_eos:
                            reason = "stop"
                            break
                        ids.append(token)
                        if len(ids) >= params.max_tokens:
                            break
                        emit(ids, False, None)
                emit(ids, True, reason)
            finally:
                self._running -= 1
                self._aborted.discard(request_id)

    async def generate(
        self, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        if params.lora is not None:
            raise RequestFailedError("llama.cpp replicas in airan serve no LoRA adapters")
        llm = self._engine()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ids: list[int], finished: bool, reason: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (list(ids), finished, reason))

        worker = asyncio.ensure_future(asyncio.to_thread(self._run, list(prompt_token_ids), params, request_id, emit))
        sent_text, sent_tokens, finished = "", 0, False
        try:
            while not finished:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, worker}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    try:
                        worker.result()  # raises the worker's error, if any
                    except Exception as e:  # e.g. the prompt does not fit the context
                        raise RequestFailedError(f"llama.cpp: {type(e).__name__}: {e}") from e
                    continue
                ids, finished, reason = getter.result()
                # decode the whole answer: a multi-byte character may span tokens
                text = llm.detokenize(ids).decode("utf-8", errors="ignore")
                if not finished and (len(ids) == sent_tokens or text.endswith("\ufffd")):
                    continue
                yield GenerationChunk(
                    text_delta=text[len(sent_text):], completion_tokens=len(ids), prompt_tokens=len(prompt_token_ids),
                    finished=finished, finish_reason=reason if finished else None,
                    token_ids=tuple(ids[sent_tokens:]),
                )  # fmt: skip
                sent_text, sent_tokens = text, len(ids)
        finally:
            if not finished:
                self._aborted.add(request_id)
            if not worker.done():  # the worker sees the abort at its next token
                await asyncio.shield(worker)

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def load(self) -> EngineLoad:
        return EngineLoad(running=self._running, waiting=self._waiting)

    async def check_health(self) -> None:
        self._engine()

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probability of each token after the first given those before it (needs logits_all)."""
        import numpy as np

        if not self.settings.logits_all:
            raise RequestFailedError("prompt_logprobs needs LlamaCppSettings(logits_all=True)")
        llm = self._engine()
        with self._lock:
            llm.reset()
            llm.eval(token_ids)
            logits = np.asarray(llm.scores[: len(token_ids) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
        return list(logits[np.arange(len(token_ids) - 1), token_ids[1:]] - logz)
