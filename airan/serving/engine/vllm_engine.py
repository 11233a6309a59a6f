"""vLLM V1 `AsyncLLM` behind the `EngineClient` protocol.

Paged attention is vLLM's own; prefix caching is switched on so the shared
system prompt and KPI preamble of network-ops queries are computed once.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from airan.serving.engine.protocol import (
    EngineDeadError,
    EngineLoad,
    GenerationChunk,
    GenerationParams,
    RequestFailedError,
)

log = logging.getLogger(__name__)
GIB = 1 << 30


@dataclass(frozen=True)
class VllmSettings:
    model_path: Path
    max_model_len: int
    dtype: str = "bfloat16"
    kv_cache_gb: float = 1.0
    max_num_seqs: int = 16
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    seed: int = 0
    # LoRA adapters this engine may apply (name -> path); empty = LoRA off
    adapters: tuple[tuple[str, str], ...] = ()
    max_lora_rank: int = 16
    max_loras: int = 4


def settings_for(model, engine, model_path: Path, adapters: tuple[tuple[str, str], ...] = ()) -> VllmSettings:
    """Engine settings of one replica from the typed config (ModelSpec + EngineConfig)."""
    return VllmSettings(
        model_path=model_path,
        max_model_len=model.max_model_len,
        dtype=model.dtype,
        kv_cache_gb=engine.kv_cache_gb,
        max_num_seqs=engine.max_num_seqs,
        enforce_eager=engine.enforce_eager,
        enable_prefix_caching=engine.enable_prefix_caching,
        seed=engine.seed,
        adapters=adapters,
        max_lora_rank=engine.max_lora_rank,
        max_loras=engine.max_loras,
    )


def cpu_engine_env(cpu_ids: list[int] | None) -> dict[str, str]:
    """Environment for a CPU engine pinned to `cpu_ids` (None = vLLM's default)."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": "auto"}
    if cpu_ids:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpu_ids))
        env["OMP_NUM_THREADS"] = str(len(cpu_ids))
    return env


def replica_settings(model, engine, model_path: Path, adapters: tuple[tuple[str, str], ...],
                     cpu_ids: list[int] | None) -> VllmSettings:  # fmt: skip
    """`engine.kind: vllm` for `kinds.replica_engine`: the CPU binding travels in `cpu_engine_env`."""
    return settings_for(model, engine, model_path, adapters)


# what `kinds.replica_engine` sets in the replica actor's environment
replica_env = cpu_engine_env


class _LatestSchedulerStats:
    """vLLM stat logger that keeps only the newest scheduler snapshot."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is None:
                    return
                sink.running = scheduler_stats.num_running_reqs
                sink.waiting = scheduler_stats.num_waiting_reqs
                sink.kv_cache_usage = scheduler_stats.kv_cache_usage
                prefix = scheduler_stats.prefix_cache_stats
                sink.prefix_queries += prefix.queries
                sink.prefix_hits += prefix.hits

            def log_engine_initialized(self):
                pass

        return _Logger(vllm_config, engine_index)


class VllmEngine:
    """One vLLM AsyncLLM; `start()` spawns it (the constructor never does)."""

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self.max_model_len = settings.max_model_len
        self._llm = None
        self._stats = _LatestSchedulerStats()
        # vLLM identifies adapters by a positive int id
        self._loras = {name: (i + 1, path) for i, (name, path) in enumerate(settings.adapters)}

    async def start(self) -> None:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        args = AsyncEngineArgs(
            model=str(s.model_path),
            tokenizer=str(s.model_path),
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            enforce_eager=s.enforce_eager,
            enable_prefix_caching=s.enable_prefix_caching,
            kv_cache_memory_bytes=int(s.kv_cache_gb * GIB),
            seed=s.seed,
            enable_lora=bool(s.adapters),
            max_lora_rank=s.max_lora_rank,
            max_loras=s.max_loras,
            disable_log_stats=False,
            # NEAR_RT before NON_RT before BEST_EFFORT, earliest deadline first (GenerationParams.priority)
            scheduling_policy="priority",
            # compact JSON: whitespace between tokens would only spend the token budget
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        )
        # vLLM's CPU backend lets this legacy variable override kv_cache_memory_bytes (whole GiB only)
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._stats.factory])

    def _engine(self):
        if self._llm is None:
            raise EngineDeadError("engine not started")
        if self._llm.errored:
            raise EngineDeadError(f"vLLM engine is dead: {self._llm.dead_error}")
        return self._llm

    async def generate(
        self, prompt_token_ids: list[int], params: GenerationParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import (
            RequestOutputKind,
            SamplingParams,
            StructuredOutputsParams,
        )

        llm = self._engine()
        sampling = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=_structured(params, StructuredOutputsParams),
        )
        lora_request = self._lora_request(params.lora)
        completion_tokens = 0
        queue_ms = None
        finished = False
        try:
            async for out in llm.generate(
                TokensPrompt(prompt_token_ids=prompt_token_ids), sampling, request_id, lora_request=lora_request,
                priority=params.priority,
            ):
                completion = out.outputs[0]
                completion_tokens += len(completion.token_ids)
                if queue_ms is None:
                    queue_ms = _engine_queue_ms(out)
                finished = out.finished
                prefill_ms, decode_ms = _engine_phase_ms(out) if finished else (None, None)
                yield GenerationChunk(
                    text_delta=completion.text,
                    completion_tokens=completion_tokens,
                    prompt_tokens=len(prompt_token_ids),
                    finished=out.finished,
                    finish_reason=completion.finish_reason if out.finished else None,
                    engine_queue_ms=queue_ms,
                    prefill_ms=prefill_ms,
                    decode_ms=decode_ms,
                    token_ids=tuple(completion.token_ids),
                )
        except (asyncio.CancelledError, GeneratorExit):
            raise  # AsyncLLM.generate aborts the request itself on cancel
        except EngineDeadError:
            raise
        except Exception as e:
            if self._llm is not None and self._llm.errored:
                raise EngineDeadError(str(e)) from e
            raise RequestFailedError(f"{type(e).__name__}: {e}") from e
        finally:
            if not finished and self._llm is not None and not self._llm.errored:
                await self._llm.abort(request_id)

    def _lora_request(self, name: str | None):
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        if name not in self._loras:
            raise RequestFailedError(f"adapter '{name}' is not loaded on this replica")
        lora_id, path = self._loras[name]
        return LoRARequest(name, lora_id, path)

    async def prompt_logprobs(self, token_ids: list[int], request_id: str, lora: str | None = None) -> list[float]:
        """Log-probability of each token after the first given those before it (perplexity)."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import SamplingParams

        sampling = SamplingParams(max_tokens=1, prompt_logprobs=0)
        final = None
        async for out in self._engine().generate(TokensPrompt(prompt_token_ids=token_ids), sampling, request_id,
                                                 lora_request=self._lora_request(lora)):  # fmt: skip
            final = out
        return [entry[tok].logprob for tok, entry in zip(token_ids[1:], final.prompt_logprobs[1:])]

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and not self._llm.errored:
            await self._llm.abort(request_id)

    def load(self) -> EngineLoad:
        s = self._stats
        hit_rate = s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0
        return EngineLoad(s.running, s.waiting, s.kv_cache_usage, hit_rate)

    async def check_health(self) -> None:
        await self._engine().check_health()

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def _engine_queue_ms(out) -> float | None:
    metrics = getattr(out, "metrics", None)
    queued, scheduled = getattr(metrics, "queued_ts", 0.0), getattr(metrics, "scheduled_ts", 0.0)
    if queued and scheduled and scheduled >= queued:
        return (scheduled - queued) * 1000.0
    return None


def _engine_phase_ms(out) -> tuple[float | None, float | None]:
    """(prefill, decode) milliseconds from the engine core's own timestamps of a finished request."""
    metrics = getattr(out, "metrics", None)
    scheduled, first, last = (getattr(metrics, k, 0.0) for k in ("scheduled_ts", "first_token_ts", "last_token_ts"))
    prefill = (first - scheduled) * 1000.0 if scheduled and first >= scheduled else None
    decode = (last - first) * 1000.0 if first and last >= first else None
    return prefill, decode


def _structured(params: GenerationParams, structured_outputs_params):
    if params.grammar is not None:
        return structured_outputs_params(regex=params.grammar.regex())
    if params.json_schema:
        return structured_outputs_params(json=params.json_schema)
    return None
