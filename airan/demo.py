"""`airan demo`: the whole product in one command on this machine.

Starts one Ray node per configured site, places the replicas, serves gRPC on
127.0.0.1, asks what RAN controllers ask (with KPI context), shows a drain and
an error, and shuts everything down.
"""
from __future__ import annotations

import asyncio
import time

import grpc
from rich.console import Console
from rich.table import Table

from airan.client import AsyncAiranClient, build_request, kpi
from airan.config import AiranConfig
from airan.serving.server import ControlPlane
from airan.v1 import netops_pb2

console = Console()
if not console.is_terminal:  # piped or logged: 80 columns squeeze the tables
    console = Console(width=140)


def _questions(sites: list[str]) -> list[dict]:
    s1, s2, s3 = (sites * 3)[:3]
    now = time.time()
    return [
        dict(
            question=f"Why did downlink throughput drop on {s1}/c1 in the last minute?",
            site_ids=[s1],
            cell_ids=[f"{s1}/c1"],
            controller_id="xapp-ts",
            priority="near_rt",
            kpis=[
                kpi("DRB.UEThpDl", 38_000, "kbit/s", f"{s1}/c1", now - 60),
                kpi("DRB.UEThpDl", 9_500, "kbit/s", f"{s1}/c1", now),
                kpi("RRU.PrbUsedDl", 271, "PRB", f"{s1}/c1", now),
                kpi("RRU.PrbAvailDl", 2, "PRB", f"{s1}/c1", now),
                kpi("RRC.ConnMean", 412, "UE", f"{s1}/c1", now),
            ],
        ),
        dict(
            question=f"Summarise the load of {s2} and say if a cell can sleep for energy saving.",
            site_ids=[s2],
            controller_id="rapp-energy",
            priority="non_rt",
            kpis=[
                kpi("RRU.PrbUsedDl", 12, "PRB", f"{s2}/c1", now),
                kpi("RRU.PrbUsedDl", 9, "PRB", f"{s2}/c2", now),
                kpi("RRC.ConnMean", 14, "UE", f"{s2}/c2", now),
                kpi("PEE.AvgPower", 310, "W", f"{s2}/c2", now),
            ],
        ),
        dict(
            question=f"Handover failures rose on {s3}/c2; propose a handover offset change.",
            site_ids=[s3],
            cell_ids=[f"{s3}/c2"],
            controller_id="xapp-ts",
            priority="near_rt",
            kpis=[
                kpi("MM.HoExeInterReq", 320, "", f"{s3}/c2", now),
                kpi("MM.HoExeInterSucc", 212, "", f"{s3}/c2", now),
                kpi("MM.HoExeInterFail", 108, "", f"{s3}/c2", now),
            ],
        ),
    ]


def injected_congestion(config: AiranConfig, seed: int = 7):
    """Simulate 40 min of the config's sites with a congestion event injected on the first
    site's first cell; return the explanation request the near-RT controller makes."""
    from airan.core.causes import CAUSES
    from sims.events import events_from_specs
    from sims.simulate import SimConfig, Simulator, run
    from sims.topology import topology_from_config

    topology = topology_from_config(config, seed=seed, cells_per_site=(2, 3))
    cell = f"{config.sites[0].id}/c1"
    kind = CAUSES["CONGESTION"].event_kind
    events = events_from_specs([f"{kind}:{cell}@20m+60m:0.9"], topology)
    sim_config = SimConfig(duration_s=40 * 60, interval_s=60, seed=seed)
    queries = run(Simulator(topology, events, sim_config)).queries
    q = next(q for q in queries if q.trigger == kind and q.kind == "event_explain")
    t0 = sim_config.start.timestamp()
    return dict(
        question=q.question,
        site_ids=q.site_ids,
        cell_ids=q.cell_ids,
        controller_id=q.controller_id,
        kpis=[kpi(k["name"], k["value"], k["unit"], k["cell_id"], t0 + k["t_s"]) for k in q.kpi_context],
    )


def _cause(value: int) -> str:
    return netops_pb2.Cause.Name(value).removeprefix("CAUSE_")


def _answer_text(d: netops_pb2.Diagnosis) -> str:
    actions = "; ".join(
        netops_pb2.ActionType.Name(a.type).removeprefix("ACTION_")
        + (f" {a.target_cell_id}" if a.target_cell_id else "")
        + (f" {a.value:g}{a.unit}" if a.unit else "")
        for a in d.actions
    )
    return (
        f"{_cause(d.cause)} on {', '.join(d.affected_cell_ids) or '-'}, "
        f"{netops_pb2.Severity.Name(d.severity).removeprefix('SEVERITY_')}\n-> {actions}"
        + (f"\ncites: {d.rationale}" if d.rationale else "")
    )


def _verdict(cause: str, cells, want_cause: str, want_cells) -> str:
    ok = cause == want_cause and (want_cause == "NORMAL" or set(want_cells) <= set(cells))
    return "[green]right[/]" if ok else "[red]wrong[/]"


async def _diagnoses(client: AsyncAiranClient, config: AiranConfig) -> None:
    """The injected event, then held-out simulator cases: the model's answer beside the detector's."""
    from airan.evaluation.cases import TEST_SEED, build_cases
    from airan.evaluation.runner import ask_request

    event = injected_congestion(config)
    cell = event["cell_ids"][0]
    table = Table(title=f"diagnosis of an injected congestion at {cell} (simulated, {len(event['kpis'])} KPI samples)",
                  show_lines=True)  # fmt: skip
    for col in ("loop", "evidence the model saw", "model (compact answer)", "detector", "latency"):
        table.add_column(col, overflow="fold")
    for priority in ("near_rt", "non_rt"):
        r = await client.ask(build_request(diagnosis=True, priority=priority, **event), timeout_s=120)
        d = r.diagnosis
        table.add_row(
            priority.upper(), "\n".join(d.evidence), f"{_answer_text(d)}\n{_verdict(_cause(d.cause), d.affected_cell_ids, 'CONGESTION', [cell])}",
            f"{_cause(d.detector_cause)} {d.detector_confidence:.2f}", f"{r.timings.total_ms:.0f} ms\n{r.prompt_tokens} prompt tokens",
        )  # fmt: skip
    console.print(table)

    # held-out cases (the evaluation's test seeds, one per label): show where the model is wrong
    wrong = None
    right = 0
    items = build_cases(7, TEST_SEED)
    errors = 0
    for item in items:
        try:
            r = await client.ask(ask_request(item, diagnosis=True), timeout_s=120)
        except grpc.aio.AioRpcError as e:  # an answer the gateway could not validate is an error, never a guess
            errors += 1
            console.print(f"  {item.item_id}: {e.code().name}: {e.details()[:160]}")
            continue
        d = r.diagnosis
        if _cause(d.cause) == item.label:
            right += 1
        elif wrong is None:
            wrong = (item, r)
    console.print(f"held-out simulator cases: the model named the right cause in {right} of {len(items)}"
                  + (f" ({errors} refused as invalid)" if errors else ""))
    if wrong is not None:
        item, r = wrong
        d = r.diagnosis
        console.print(
            f"  a case it gets wrong: {item.item_id}, truth {item.label} on {', '.join(item.affected_cells) or '-'}; "
            f"model {_cause(d.cause)} on {', '.join(d.affected_cell_ids) or '-'}; "
            f"detector {_cause(d.detector_cause)} ({d.detector_confidence:.2f})"
        )


async def _knowledge_questions(client: AsyncAiranClient) -> None:
    """Free text grounded in the knowledge base: the answer and the passages it cited (kept only
    when they were shown to the model), beside the passages retrieval put in the prompt."""
    table = Table(title="free-text questions, answered from the knowledge base", show_lines=True)
    for col in ("question", "answer", "cited", "passages shown", "latency"):
        table.add_column(col, overflow="fold")
    for question in ("What does RRU.PrbUsedDl measure?", "How do I reduce handover failures between two cells?"):
        r = await client.ask(build_request(question, priority="non_rt", max_tokens=64), timeout_s=120)
        table.add_row(question, r.text.strip() or "(empty)", ", ".join(c.passage_id for c in r.citations) or "-",
                      ", ".join(r.prompt.passage_ids) or "-", f"{r.timings.total_ms:.0f} ms")  # fmt: skip
    console.print(table)


async def _demo(config: AiranConfig) -> int:
    from airan.factory.ensure import ensure_served_models

    ensure_served_models(config, say=console.print)  # a fresh clone: SmolLM2 and the merged NetOps model, once
    with console.status(
        f"starting {len(config.sites)} Ray site nodes and {sum(r.count for r in config.replicas)} vLLM replicas..."
    ):
        plane = await ControlPlane(config).__aenter__()
    try:
        console.print(
            f"[green]serving on {plane.address}[/] — startup: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in plane.startup_s.items())
        )
        sites = [s.id for s in config.sites]
        async with AsyncAiranClient(plane.address) as client:
            table = Table(title="network-ops queries (unary)", show_lines=True)
            for col in ("controller", "question", "served by", "tokens in/out", "TTFT ms", "total ms", "answer"):
                table.add_column(col, overflow="fold")
            for q in _questions(sites):
                r = await client.ask(build_request(max_tokens=48, deadline_s=30, **q), timeout_s=60)
                table.add_row(
                    q["controller_id"],
                    q["question"],
                    f"{r.site_id}\n{r.replica_id}",
                    f"{r.prompt_tokens}/{r.completion_tokens}",
                    f"{r.timings.ttft_ms:.0f}",
                    f"{r.timings.total_ms:.0f}",
                    r.text.strip()[:240] or "(empty)",
                )
            console.print(table)
            await _diagnoses(client, config)
            await _knowledge_questions(client)

            console.print(f"[bold]streaming[/] from {sites[-1]}: ", end="")
            async for chunk in client.ask_stream(
                build_request("List the KPIs you would watch for congestion.", site_ids=[sites[-1]], max_tokens=32)
            ):
                console.print(chunk.text_delta.replace("\n", " "), end="", markup=False, highlight=False)
                if chunk.final:
                    console.print(f"\n  -> {chunk.site_id}, {chunk.completion_tokens} tokens, TTFT {chunk.timings.ttft_ms:.0f} ms")

            drained = await client.drain_site(sites[0])
            r = await client.ask(build_request("Is the site healthy?", site_ids=[sites[0]], max_tokens=8))
            console.print(
                f"[bold]drain[/] {drained.site.site_id}: a query about it is now served by {r.site_id} "
                "(the radio or the operator comes first)"
            )
            await client.drain_site(sites[0], resume=True)

            try:
                await client.ask(build_request("What is wrong?", site_ids=["bs-99"]))
            except grpc.aio.AioRpcError as e:
                console.print(f"[bold]error example[/]: {e.code().name}: {e.details()}")
            if config.auth.mode != "none":  # who may call (README "Security"): a caller without credentials
                async with AsyncAiranClient(plane.address, token="") as anonymous:
                    try:
                        await anonymous.drain_site(sites[0])
                    except grpc.aio.AioRpcError as e:
                        console.print(f"[bold]DrainSite without a token[/]: {e.code().name}: {e.details()}")
            if plane.metrics is not None:
                console.print(f"[bold]metrics[/]: http://{config.server.host}:{plane.metrics.port}/metrics")

            replicas = await client.replicas()
            console.print(
                "replicas: "
                + ", ".join(f"{x.replica_id}@{x.site_id}({x.ray_node_id[:8]})" for x in replicas.replicas)
            )
        return 0
    finally:
        with console.status("shutting down replicas and Ray nodes..."):
            await plane.stop()
        console.print("[green]demo finished, everything stopped[/]")


def run_demo(config: AiranConfig) -> int:
    return asyncio.run(_demo(config))
