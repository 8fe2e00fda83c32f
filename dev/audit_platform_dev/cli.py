"""The development commands ``audit-platform`` gains where this package is installed:
``stack up|down|status|env|run`` and ``demo`` (``register`` adds them to the platform's CLI)."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

from audit_platform.settings import Settings
from audit_platform_dev.stack import LocalStack, StackError, run_with_stack

stack_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Local real servers (PostgreSQL, Elasticsearch) for development and tests.",
    no_args_is_help=True,
)


def register(platform: typer.Typer) -> None:
    """Add the development commands to the platform's command line."""
    platform.add_typer(stack_app, name="stack")
    platform.command("demo")(demo)


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
        typer.secho(
            "No local servers are running; start them with: audit-platform stack up", err=True
        )
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


def demo(
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: at Ctrl-C).")
    ] = None,
    dagster_port: Annotated[int, typer.Option(help="Dagster webserver port.")] = 3000,
    api_port: Annotated[int, typer.Option(help="Audit API port.")] = 8000,
    shop_port: Annotated[int, typer.Option(help="Demo shop service port.")] = 8100,
) -> None:
    """Run the whole platform locally with a demo shop service and its traffic (Ctrl-C stops
    everything this started)."""
    from audit_platform_dev.demo.run import run_demo
    from audit_platform_dev.stack.processes import ProcessFailed

    try:
        code = run_demo(
            Settings(),
            say=typer.echo,
            duration=duration,
            dagster_port=dagster_port,
            api_port=api_port,
            shop_port=shop_port,
        )
    except (StackError, ProcessFailed) as exc:
        raise _fail(exc) from exc
    raise typer.Exit(code=code)
