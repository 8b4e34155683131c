"""`erc finetune-text`: fine-tune a text encoder as an utterance classifier, for `erc extract --text-model DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from erc.cli.extract import (
    DatasetOption,
    LabelSetOption,
    ManifestOption,
    RootOption,
    TextModelOption,
    console,
    fail,
)
from erc.errors import ErcError


def finetune_text_command(
    dataset: DatasetOption,
    root: RootOption,
    text_model: TextModelOption,
    out: Annotated[Path, typer.Option(help="directory for the fine-tuned encoder, tokenizer and head")],
    manifest: ManifestOption = None,
    label_set: LabelSetOption = "6class",
    epochs: Annotated[int, typer.Option(help="training epochs (early-stopped on the dev loss)")] = 3,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate")] = 2e-5,
    batch_size: Annotated[int, typer.Option(help="utterances per step")] = 16,
    max_length: Annotated[int, typer.Option(help="tokens of the context input (use the same for extraction)")] = 128,
    pooling: Annotated[str | None, typer.Option(help="first | mean | utterance: how the head reads the encoder (default: from the checkpoint, see erc extract --text-pooling)")] = None,
    train_layers: Annotated[int | None, typer.Option(help="train only the top N encoder layers (default: all)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop after N optimizer steps (e.g. to time a short run)")] = None,
    eval_steps: Annotated[int | None, typer.Option(help="evaluate the dev loss every N steps (default: each epoch)")] = None,
    patience: Annotated[int, typer.Option(help="stop after this many dev evaluations without a lower loss")] = 1,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of the head, dropout, shuffling and a held-out dev set")] = 0,
) -> None:
    """Fine-tune a text encoder on a corpus's training split; save it where `erc extract --text-model` loads it."""
    from erc.features.finetune import FinetuneConfig, finetune

    try:
        config = FinetuneConfig(
            dataset=dataset, root=root, text_model=text_model, out=out, manifest=manifest, label_set=label_set,
            epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, pooling=pooling,
            train_layers=train_layers, max_steps=max_steps, eval_steps=eval_steps, patience=patience, device=device, seed=seed,
        )
        from erc.features.text import pooling_choice

        console.print(f"pooling: {config.pooling} ({pooling_choice(pooling, text_model)[1]})")
        with Progress(
            TextColumn("[bold]fine-tune"), BarColumn(), MofNCompleteColumn(), TextColumn("steps {task.fields[loss]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
        ) as bar:
            task = bar.add_task("fine-tune", total=None, loss="")

            def on_step(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, total=total, loss=f"loss {loss:.3f}")

            result = finetune(config, on_step=on_step)
    except ErcError as exc:
        raise fail(exc) from None
    console.print(f"best dev loss {result.dev['loss']:.4f} (weighted F1 {result.dev['weighted_f1']:.4f}) "
                  f"at step {result.best_step} of {result.steps}; {result.train_utterances_per_second:.1f} utterances/s")
    if result.test is not None:
        console.print(f"classifier alone on test: weighted F1 {result.test['weighted_f1']:.4f} "
                      f"accuracy {result.test['accuracy']:.4f}")
    console.print(f"saved to {result.out}: use `erc extract --text-model {result.out}`")
