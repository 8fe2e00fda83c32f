"""The `audit-platform` command line: thin wiring from arguments to the core."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer

from audit_platform.settings import Settings
from audit_platform.stack import LocalStack, StackError, run_with_stack

app = typer.Typer(
    help="audit-platform: PostgreSQL changes to a searchable, attributed audit trail.",
    no_args_is_help=True,
)
stack_app = typer.Typer(
    help="Local real servers (PostgreSQL, Elasticsearch) for development and tests.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


@stack_app.command("up")
def stack_up() -> None:
    """Start PostgreSQL and Elasticsearch (or reuse the running ones) and wait until ready."""
    try:
        states = LocalStack().up()
    except StackError as exc:
        raise _fail(exc) from exc
    for state in states:
        typer.echo(f"{state.name:<14} {state.source:<8} {state.detail}")
    typer.echo('Load the URLs into your shell with: eval "$(audit-platform stack env)"')


@stack_app.command("down")
def stack_down() -> None:
    """Stop the servers this checkout started (by recorded PID); leave anything else alone."""
    try:
        states = LocalStack().down()
    except StackError as exc:
        raise _fail(exc) from exc
    for state in states:
        typer.echo(f"{state.name:<14} {state.source}")


@stack_app.command("status")
def stack_status() -> None:
    """Say, per server, where it is and whether it answers."""
    for state in LocalStack().status():
        typer.echo(f"{state.name:<14} {state.source:<8} {state.detail}")


@stack_app.command("env")
def stack_env() -> None:
    """Print the running servers' URLs and credentials as shell exports."""
    exports = LocalStack().env()
    if not exports:
        typer.secho("No local servers are running; start them with: audit-platform stack up",
                    err=True)  # fmt: skip
        raise typer.Exit(code=1)
    for key, value in exports.items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@stack_app.command(
    "run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def stack_run(
    ctx: typer.Context,
    command: Annotated[list[str] | None, typer.Argument(help="The command to run.")] = None,
) -> None:
    """Run a command with the servers up and AUDIT_* set; stop afterwards what this started."""
    args = [*(command or []), *ctx.args]
    if not args:
        raise _fail(ValueError("give a command to run, e.g. `audit-platform stack run -- pytest`"))
    try:
        code = run_with_stack(args, Settings())
    except StackError as exc:
        raise _fail(exc) from exc
    raise typer.Exit(code=code)


@app.command("demo")
def demo() -> None:
    """Start the local stack and say what runs where (the pipeline demo grows from here)."""
    stack_up()
    for state in LocalStack().status():
        typer.echo(f"{state.name:<14} {state.detail}")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
