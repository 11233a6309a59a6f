"""The `airan` command line."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from airan.config import dump_config, load_config_or_exit
from airan.evaluation.cli import app as eval_app
from airan.factory.cli import app as model_app
from sims.cli import app as sim_app

app = typer.Typer(help="airan: small language models at RAN edge sites.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate airan config files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(sim_app, name="sim")
app.add_typer(eval_app, name="eval")

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="airan YAML config (default: the built-in 3-site config)")
]


@app.command()
def serve(
    config: ConfigOption = None,
    port: Annotated[Optional[int], typer.Option(help="override server.port (0 = any free port)")] = None,
    log_level: Annotated[str, typer.Option(help="Python log level")] = "INFO",
) -> None:
    """Start the control plane and the replicas; serve until Ctrl-C or SIGTERM."""
    import asyncio
    import logging
    import signal

    from airan.serving.server import ControlPlane

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config_or_exit(config)
    if port is not None:
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"port": port})})

    async def run() -> None:
        async with ControlPlane(cfg) as plane:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            typer.echo(f"airan serving on {plane.address} (startup {sum(plane.startup_s.values()):.0f} s)")
            await stop.wait()
            typer.echo("shutting down: health NOT_SERVING, finishing in-flight queries")

    from airan.store.registry import ModelNotAvailable

    try:
        asyncio.run(run())
    except ModelNotAvailable as e:
        typer.echo(f"cannot serve: {e}", err=True)
        raise typer.Exit(2)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="the network-operations question")],
    site: Annotated[list[str], typer.Option("--site", "-s", help="target site id (repeatable)")] = [],
    cell: Annotated[list[str], typer.Option("--cell", help="target cell id (repeatable)")] = [],
    kpi: Annotated[
        list[str], typer.Option("--kpi", "-k", help="KPI sample NAME=VALUE[unit][@CELL], e.g. DRB.UEThpDl=850kbit/s@bs-01/c1")
    ] = [],
    target: Annotated[str, typer.Option(help="control plane host:port")] = "127.0.0.1:50051",
    stream: Annotated[bool, typer.Option("--stream", help="print tokens as they arrive")] = False,
    priority: Annotated[str, typer.Option(help="near_rt | non_rt | best_effort")] = "best_effort",
    max_tokens: Annotated[int, typer.Option(help="0 = server default")] = 0,
    deadline_ms: Annotated[Optional[float], typer.Option(help="answer budget from now")] = None,
    controller: Annotated[str, typer.Option(help="controller id")] = "airan-cli",
) -> None:
    """Ask a running control plane a question, as a RAN controller would."""
    import grpc

    from airan.client import AiranClient, build_request, parse_kpi

    try:
        request = build_request(
            question,
            site_ids=site,
            cell_ids=cell,
            kpis=[parse_kpi(k) for k in kpi],
            priority=priority,
            max_tokens=max_tokens,
            controller_id=controller,
            deadline_s=deadline_ms / 1000 if deadline_ms is not None else None,
        )
    except (ValueError, KeyError) as e:
        typer.echo(f"bad argument: {e}", err=True)
        raise typer.Exit(2)
    timeout = None if deadline_ms is None else deadline_ms / 1000 + 5
    with AiranClient(target) as client:
        try:
            if stream:
                for chunk in client.ask_stream(request, timeout_s=timeout):
                    typer.echo(chunk.text_delta, nl=False)
                    if chunk.final:
                        final = chunk
                typer.echo("")
            else:
                final = client.ask(request, timeout_s=timeout)
                typer.echo(final.text)
        except grpc.RpcError as e:
            typer.echo(f"error {e.code().name}: {e.details()}", err=True)
            raise typer.Exit(1)
    t = final.timings
    typer.echo(
        f"-- served by {final.replica_id} at site {final.site_id} ({final.model}); "
        f"tokens {final.prompt_tokens} in / {final.completion_tokens} out; "
        f"queue {t.queue_ms:.0f} ms, first token {t.ttft_ms:.0f} ms, total {t.total_ms:.0f} ms",
        err=True,
    )
    if final.placement.note:  # served away from the site asked for, or by the detector: why
        typer.echo(f"-- {final.placement.note}", err=True)
    if final.citations:  # free text: the knowledge passages the answer cites
        typer.echo("-- cites " + "; ".join(f"[{c.passage_id}] {c.title}" for c in final.citations), err=True)


auth_app = typer.Typer(help="Bearer tokens that name callers when mTLS is off (README \"Security\").",
                       no_args_is_help=True)
app.add_typer(auth_app, name="auth")


@auth_app.command("token")
def auth_token(
    controller: Annotated[str, typer.Option("--controller", help="the caller's id, as auth.controllers[] lists it")],
    ttl_s: Annotated[float, typer.Option("--ttl-s", min=1, help="seconds the token stays valid")] = 86400.0,
    config: ConfigOption = None,
) -> None:
    """Print a token naming CONTROLLER, signed with the server's key (auth.token_key_file, else the local
    key a server in token mode makes); the caller sends it as `authorization: Bearer <token>`
    (the airan client reads it from $AIRAN_TOKEN)."""
    from airan.core.authz import default_key_file, issue_token, read_or_create_key

    cfg = load_config_or_exit(config)
    known = [c.id for c in cfg.auth.controllers]
    if controller not in known:
        typer.echo(f"'{controller}' is not in auth.controllers ({', '.join(known) or 'none'}): the server would "
                   "refuse its calls (PERMISSION_DENIED); add it with its scope first", err=True)  # fmt: skip
        raise typer.Exit(2)
    try:
        key = read_or_create_key(cfg.auth.token_key_file or default_key_file())
    except (OSError, ValueError) as e:
        typer.echo(f"cannot read the token key: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(issue_token(key, controller, ttl_s))


@app.command()
def demo(config: ConfigOption = None) -> None:
    """Start 3 simulated sites on local Ray, place replicas, ask a few questions, shut down."""
    from airan.demo import run_demo

    raise typer.Exit(run_demo(load_config_or_exit(config)))


@config_app.command("validate")
def config_validate(file: Annotated[Path, typer.Argument(help="YAML config to check")]) -> None:
    """Exit 0 if FILE is a valid airan config, else print every problem and exit 1."""
    config = load_config_or_exit(file, exit_code=1)
    typer.echo(
        f"{file}: valid ({len(config.sites)} sites, {len(config.models)} models, "
        f"{sum(r.count for r in config.replicas)} replicas)"
    )


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the config with every default filled in."""
    typer.echo(dump_config(load_config_or_exit(config)))


if __name__ == "__main__":
    app()
