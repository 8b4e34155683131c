"""The `erc` command line: each command parses options and calls one library function."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal Emotion Recognition in Conversation.")


def _register() -> None:
    from erc.cli import extract as extract_cli

    app.command("extract")(extract_cli.extract_command)
    app.command("inspect")(extract_cli.inspect_command)
    app.command("demo")(extract_cli.demo_command)
    from erc.cli import train as train_cli

    app.command("train")(train_cli.train_command)
    app.command("evaluate")(train_cli.evaluate_command)
    from erc.cli import compare as compare_cli

    app.command("compare")(compare_cli.compare_command)


_register()
