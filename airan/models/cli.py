"""`airan model ...` commands."""
import typer

app = typer.Typer(help="Prepare and inspect models.", no_args_is_help=True)
