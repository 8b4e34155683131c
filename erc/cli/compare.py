"""`erc compare`: parse options, train every run spec with every seed, print where the summary is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from erc.cli.extract import console, fail
from erc.errors import ConfigError, ErcError


def _variants(values: list[str]) -> dict[str, str]:
    variants = {}
    for value in values:
        label, sep, spec = value.partition("=")
        if not sep or not label.strip() or not spec.strip():
            raise ConfigError(f"--variant {value!r}: expected LABEL=SPEC, e.g. 'w/o SWFC=multiemo[no-swfc]'")
        variants[label.strip()] = spec.strip()
    return variants


def compare_command(
    features: Annotated[Path, typer.Option(help="shard set directory written by `erc extract`")],
    out: Annotated[Path, typer.Option(help="new directory for the runs and the summary")],
    models: Annotated[str, typer.Option(help="comma-separated run specs, e.g. 'multiemo,multiemo[no-swfc],lmam'")] = "",
    seeds: Annotated[int, typer.Option(help="seeds per run spec (0 .. seeds-1)")] = 3,
    epochs: Annotated[int | None, typer.Option(help="training epochs (over presets and config)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="dialogues per batch")] = None,
    lr: Annotated[float | None, typer.Option(help="initial learning rate")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="evaluate and keep a moving average of the weights (0 = off)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML: model:/train: sections, or one such mapping per model")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="LABEL=SPEC, repeatable: a run spec under a label")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | auto: the forward pass's precision in training")] = "fp32",
    allow_partial: Annotated[bool, typer.Option(help="accept an incomplete shard set (an extraction stopped early)")] = False,
) -> None:
    """Train models and ablations over several seeds; write comparison.md, comparison.png, results.json,
    differences.json (each pair's difference with its 95% interval over the test dialogues)."""
    from erc.pipeline.compare import CompareConfig, compare, split_specs

    def on_run(spec, seed, result) -> None:
        console.print(f"{spec.label} seed {seed}: test weighted F1 {result.test['weighted_f1']:.4f} "
                      f"accuracy {result.test['accuracy']:.4f}", highlight=False, markup=False)

    try:
        result = compare(
            CompareConfig(
                features=features, out=out, models=split_specs(models), seeds=seeds, epochs=epochs,
                batch_size=batch_size, lr=lr, ema_decay=ema_decay, config_file=config, variants=_variants(variant or []), device=device,
                precision=precision, allow_partial=allow_partial,
            ),
            on_run=on_run,
        )
    except ErcError as exc:
        raise fail(exc) from None
    console.print(result.markdown.read_text(), highlight=False, markup=False)
    console.print(f"table {result.markdown}, plot {result.plot}, raw results {result.results}, "
                  f"differences {result.differences}", markup=False)
