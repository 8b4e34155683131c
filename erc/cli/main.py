"""The `erc` command line: each command parses options and calls one library function."""

from __future__ import annotations

import typer

from erc.cli import compare, extract, finetune, predict, train

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal Emotion Recognition in Conversation.")
app.command("extract")(extract.extract_command)
app.command("inspect")(extract.inspect_command)
app.command("demo")(extract.demo_command)
app.command("train")(train.train_command)
app.command("evaluate")(train.evaluate_command)
app.command("compare")(compare.compare_command)
app.command("finetune-text")(finetune.finetune_text_command)
app.command("predict")(predict.predict_command)
