"""`erc train` and `erc evaluate`: parse options, call the pipeline, print the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from erc.cli.extract import console, fail
from erc.errors import ErcError


def train_command(
    model: Annotated[str, typer.Option(help="multiemo | xlstm-multiemo | lmam | pairwise | mcn-cl | text-only | concat")],
    features: Annotated[Path, typer.Option(help="shard set directory written by `erc extract`")],
    out: Annotated[Path, typer.Option(help="new run directory")],
    preset: Annotated[str | None, typer.Option(help="iemocap | meld (default: the shard set's dataset if the model has that preset)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with model: and train: sections, over the preset")] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs (over preset and config)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="dialogues per batch")] = None,
    lr: Annotated[float | None, typer.Option(help="initial learning rate")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="evaluate and keep a moving average of the weights with this decay per step (0 = off, the default)")] = None,
    seed: Annotated[int, typer.Option(help="seed of initialisation, shuffling, dropout and the dev hold-out")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    modalities: Annotated[str | None, typer.Option(help="comma-separated subset of the shards' modalities")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="clip the gradient norm to this value")] = None,
    stages: Annotated[str | None, typer.Option(help="comma-separated training stages, in order (pairwise: pmf,mff, the paper's schedule)")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | auto: the forward pass's precision (auto = bf16 where the device computes it natively)")] = "fp32",
    fusion: Annotated[str | None, typer.Option(help="multiemo's fusion: multiattn | lmam")] = None,
    no_multiattn: Annotated[bool, typer.Option("--no-multiattn", help="ablation: concatenate instead of MultiAttn fusion")] = False,
    no_swfc: Annotated[bool, typer.Option("--no-swfc", help="ablation: drop the SWFC loss")] = False,
    no_hgr: Annotated[bool, typer.Option("--no-hgr", help="ablation: drop the Soft-HGR loss")] = False,
    allow_partial: Annotated[bool, typer.Option(help="accept an incomplete shard set (an extraction stopped early)")] = False,
) -> None:
    """Train a model on a shard set; keep the best-dev checkpoint and report test metrics."""
    from erc.pipeline.train import TrainConfig, train

    ablations = {"multiattn": no_multiattn, "use_swfc": no_swfc, "use_hgr": no_hgr}
    train_config = TrainConfig(
        model=model, features=features, out=out, preset=preset, config_file=config, epochs=epochs,
        batch_size=batch_size, lr=lr, ema_decay=ema_decay, seed=seed, device=device, grad_clip=grad_clip,
        stages=[s.strip() for s in stages.split(",") if s.strip()] if stages else None, precision=precision,
        allow_partial=allow_partial,
        modalities=[m.strip() for m in modalities.split(",") if m.strip()] if modalities else None,
        model_overrides={**{name: False for name, off in ablations.items() if off},
                         **({"fusion": fusion} if fusion is not None else {})},
    )
    with Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
        TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("train", total=None, epoch=1)

        def on_batch(epoch: int, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, epoch=epoch)

        def on_epoch(record: dict) -> None:
            terms = " ".join(f"{name} {value:.4f}" for name, value in record["train"].items())
            stage = f"[{record['stage']}] " if "stage" in record else ""
            bar.console.print(
                f"{stage}epoch {record['epoch']}: {terms} | dev weighted F1 {record['dev']['weighted_f1']:.4f} "
                f"acc {record['dev']['accuracy']:.4f} | best epoch {record['best_epoch']}", highlight=False,
            )

        try:
            result = train(train_config, on_batch=on_batch, on_epoch=on_epoch)
        except ErcError as exc:
            raise fail(exc) from None
    console.print(f"best dev weighted F1 {result.dev['weighted_f1']:.4f} at epoch {result.best_epoch}")
    print_metrics(result.test, title=f"test ({result.seconds:.0f} s; run directory {result.run_dir})")


def evaluate_command(
    run: Annotated[Path, typer.Option(help="run directory written by `erc train`")],
    features: Annotated[Path | None, typer.Option(help="shard set (default: the one the run was trained on)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    allow_partial: Annotated[bool, typer.Option(help="accept an incomplete shard set (an extraction stopped early)")] = False,
    predictions: Annotated[Path | None, typer.Option(
        help="also write each test utterance's true and predicted emotion and class probabilities (.csv or .json)")] = None,
) -> None:
    """Recompute the test metrics of a run from its best checkpoint."""
    from erc.pipeline.evaluate import evaluate_run

    try:
        metrics = evaluate_run(run, features, device=device, allow_partial=allow_partial, predictions=predictions)
    except ErcError as exc:
        raise fail(exc) from None
    print_metrics(metrics, title=f"test metrics of {run}")
    if predictions is not None:
        console.print(f"predictions of {metrics['utterances']} test utterances: {predictions}")


def print_metrics(metrics: dict, *, title: str) -> None:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("F1", justify="right")
    for name, f1 in metrics["per_class_f1"].items():
        table.add_row(name, f"{f1:.4f}")
    table.add_row("[bold]weighted F1", f"[bold]{metrics['weighted_f1']:.4f}")
    table.add_row("accuracy", f"{metrics['accuracy']:.4f}")
    table.add_row("macro F1", f"{metrics['macro_f1']:.4f}")
    console.print(table)
