"""The `airan` command line."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from airan.config import ConfigError, dump_config, load_config
from airan.models.cli import app as model_app
from sims.cli import app as sim_app

app = typer.Typer(help="airan: small language models at RAN edge sites.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate airan config files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(sim_app, name="sim")

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="airan YAML config (default: the built-in 3-site config)")
]


@config_app.command("validate")
def config_validate(file: Annotated[Path, typer.Argument(help="YAML config to check")]) -> None:
    """Exit 0 if FILE is a valid airan config, else print every problem and exit 1."""
    try:
        config = load_config(file)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1)
    typer.echo(
        f"{file}: valid ({len(config.sites)} sites, {len(config.models)} models, "
        f"{sum(r.count for r in config.replicas)} replicas)"
    )


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the config with every default filled in."""
    try:
        typer.echo(dump_config(load_config(config)))
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
