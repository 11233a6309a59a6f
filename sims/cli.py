"""`airan sim ...` commands."""
import typer

app = typer.Typer(help="Simulate radio traffic, record and replay query traces.", no_args_is_help=True)
