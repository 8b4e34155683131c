"""`erc predict`: emotions of a new conversation from a trained run, as a table and a CSV / JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from erc.cli.extract import console, fail
from erc.errors import ErcError


def predict_command(
    run: Annotated[Path, typer.Option(help="run directory written by `erc train`")],
    manifest: Annotated[Path, typer.Option(help="conversation(s) as a manifest CSV; label and split columns optional")],
    out: Annotated[Path | None, typer.Option(help="write the predictions to FILE.csv or FILE.json")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    allow_partial: Annotated[bool, typer.Option(help="accept a run trained on an incomplete shard set")] = False,
) -> None:
    """Predict the emotion of every utterance of a conversation with a trained run."""
    from erc.pipeline.predict import predict_conversation

    try:
        rows = predict_conversation(run, manifest, out, device=device, allow_partial=allow_partial)
    except ErcError as exc:
        raise fail(exc) from None
    for dialogue_id in dict.fromkeys(row["dialogue_id"] for row in rows):
        print_conversation([row for row in rows if row["dialogue_id"] == dialogue_id], title=f"dialogue {dialogue_id}")
    if out is not None:
        console.print(f"wrote {len(rows)} predictions to {out}")


def print_conversation(rows: list[dict], *, title: str) -> None:
    """One row per utterance: speaker, text, predicted emotion and its probability (and the label if known)."""
    labelled = any("label" in row for row in rows)
    table = Table(title=title)
    for name, justify in (("#", "right"), ("speaker", "left"), ("text", "left"), ("emotion", "left"), ("p", "right")):
        table.add_column(name, justify=justify)
    if labelled:
        table.add_column("label")
    for row in rows:
        cells = [str(row["utterance_index"]), row["speaker"], row["text"], f"[bold]{row['predicted']}",
                 f"{row['p_' + row['predicted']]:.2f}"]
        if labelled:
            cells.append(row.get("label", ""))
        if "failures" in row:
            cells[2] += f" [yellow]({row['failures']})"
        table.add_row(*cells)
    console.print(table)
