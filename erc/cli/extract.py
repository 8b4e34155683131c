"""`erc extract`, `erc inspect`, `erc demo`: parse options, call the pipeline, print the result."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from erc.errors import ErcError, ErcWarning

console = Console()


@contextmanager
def utterance_progress(description: str):
    """A rich progress bar counting utterances; yields the ``progress(done, total)`` callback."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("utterances"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)  # "[visual]" is no markup
    return typer.Exit(code=2)


# corpus and encoder options that `erc extract` and `erc finetune-text` share
DatasetOption = Annotated[str, typer.Option(help="iemocap | meld | manifest")]
RootOption = Annotated[Path, typer.Option(help="corpus root (IEMOCAP_full_release, MELD.Raw, or the manifest's folder)")]
ManifestOption = Annotated[Path | None, typer.Option(help="manifest CSV (dataset=manifest; default ROOT/manifest.csv)")]
TextModelOption = Annotated[str, typer.Option(help="Hugging Face encoder name or local directory")]
LabelSetOption = Annotated[str, typer.Option(help="IEMOCAP classes: 6class | 4class")]


def extract_command(
    dataset: DatasetOption,
    root: RootOption,
    out: Annotated[Path, typer.Option(help="output directory for the shard set")],
    manifest: ManifestOption = None,
    text_model: TextModelOption = "roberta-base",
    text_max_length: Annotated[int, typer.Option(help="tokens of each context input (current utterance kept whole)")] = 512,
    text_pooling: Annotated[str | None, typer.Option(help="first | mean | utterance (default: from the checkpoint: its fine-tuning, a sentence-transformers mean -> utterance, else first)")] = None,
    text_context: Annotated[bool | None, typer.Option("--text-context/--no-text-context", help="encode each utterance with its speaker-prefixed past and future utterances, or alone (default: from the checkpoint: its fine-tuning, a sentence-transformers checkpoint alone, else in context)")] = None,
    face_weights: Annotated[Path | None, typer.Option(help="ResNet-101 state dict (torchvision or MultiEMO layout)")] = None,
    random_face_weights: Annotated[bool, typer.Option(help="untrained ResNet-101 (testing only; recorded in the shards)")] = False,
    faces: Annotated[str, typer.Option(help="all | largest: faces averaged per frame")] = "all",
    num_frames: Annotated[int, typer.Option(help="frames sampled per utterance (the papers use 20)")] = 20,
    modalities: Annotated[str, typer.Option(help="comma-separated subset of text,audio,visual")] = "text,audio,visual",
    label_set: LabelSetOption = "6class",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | auto: the ResNet's arithmetic (auto = bf16 where the CPU or GPU computes it natively, else fp32; fp32 is exact)")] = "auto",
    text_precision: Annotated[str, typer.Option(help="fp32 | bf16 | auto: the text encoder's arithmetic (bf16 autocast; auto as for --precision)")] = "fp32",
    compile: Annotated[bool, typer.Option(help="torch.compile the ResNet-101 and MTCNN (fused, frozen weights): ResNet about 2x and MTCNN 1.5x faster in bf16 on a CPU, one to two minutes once per worker; needs a C++ compiler, else runs eagerly (report.json says why)")] = False,
    workers: Annotated[int, typer.Option(help="local Dask worker processes")] = 1,
    scheduler: Annotated[str | None, typer.Option(help="address of an existing Dask scheduler, e.g. tcp://host:8786")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    limit: Annotated[int | None, typer.Option(help="only the first N dialogues of each split")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a shard set extracted with another configuration")] = False,
    max_failures: Annotated[int | None, typer.Option(help="stop when more utterances fail (default: 10% of them)")] = None,
    shard_utterances: Annotated[int, typer.Option(help="size-balanced shards (units of work) of whole dialogues, about this many utterances each")] = 64,
    dialogues_per_shard: Annotated[int | None, typer.Option(help="instead: this many dialogues per shard")] = None,
    seed: Annotated[int, typer.Option(help="seed of random face weights")] = 0,
    labels: Annotated[str | None, typer.Option(help="manifest: the class names, comma-separated, in this order (labels match ignoring case)")] = None,
    strict: Annotated[bool, typer.Option(help="stop at the first unforeseen exception instead of recording it against the item")] = False,
    scheduler_timeout: Annotated[float, typer.Option(help="seconds to reach --scheduler and for its first worker")] = 60.0,
    detect_max_side: Annotated[int, typer.Option(help="MTCNN sees frames shrunk to this longest side (0: full size)")] = 640,
    crop_batch: Annotated[int | None, typer.Option(help="face crops per ResNet call across utterances (default: 256 on CUDA, one utterance's crops on CPU)")] = None,
    detect_batch: Annotated[int | None, typer.Option(help="utterances whose frames share one MTCNN call (default: 8 on CUDA, one on CPU)")] = None,
    read_ahead: Annotated[int, typer.Option(help="media items (an utterance's video frames or its openSMILE features) each worker reads in a background thread ahead of its networks; 0: in line")] = 2,
) -> None:
    """Extract text, audio and visual features of a corpus into HDF5 shards."""
    from erc.pipeline.extract import ExtractConfig, extract

    show_other = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # ErcWarnings as one yellow line
        if issubclass(category, ErcWarning):
            console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            show_other(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", ErcWarning)
            warnings.showwarning = show
            config = ExtractConfig(
                dataset=dataset, root=root, out=out, manifest=manifest, text_model=text_model,
                text_max_length=text_max_length, text_context=text_context, text_pooling=text_pooling, face_weights=face_weights,
                random_face_weights=random_face_weights, faces=faces, num_frames=num_frames,
                modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()), label_set=label_set,
                precision=precision, text_precision=text_precision, compile=compile, workers=workers, scheduler=scheduler, device=device, limit=limit,
                overwrite=overwrite, max_failures=max_failures, shard_utterances=shard_utterances, dialogues_per_shard=dialogues_per_shard,
                seed=seed,
                labels=tuple(name.strip() for name in labels.split(",")) if labels is not None else None,
                strict=strict, scheduler_timeout=scheduler_timeout, detect_max_side=detect_max_side or None,
                crop_batch=crop_batch, detect_batch=detect_batch, read_ahead=read_ahead,
            )
            if "text" in config.modalities:
                from erc.features.text import context_choice, pooling_choice

                console.print(f"text pooling: {config.text_pooling} ({pooling_choice(text_pooling, text_model)[1]})")
                console.print(f"text context: {'on' if config.text_context else 'off'} "
                              f"({context_choice(text_context, text_model)[1]})")
            if precision == "auto" and "visual" in config.modalities:
                console.print(f"visual precision: {config.precision} (auto)")
            if text_precision == "auto" and "text" in config.modalities:
                console.print(f"text precision: {config.text_precision} (auto)")
            if config.random_face_weights and "visual" in config.modalities:
                console.print("[yellow]visual features use RANDOM face weights: fine for testing, meaningless for "
                              "research[/yellow]")
            with utterance_progress(f"extract {dataset}") as progress:
                result = extract(config, progress=progress)
    except ErcError as exc:
        raise fail(exc) from None
    incomplete = "" if result.complete else "; the shard set is INCOMPLETE"
    console.print(
        f"{result.utterances} utterances in {result.shards_written + result.shards_skipped} shards "
        f"({result.shards_written} written, {result.shards_skipped} already done) in {result.seconds:.1f} s; "
        f"{len({f['item'] for f in result.failures})} utterances with failures{incomplete} (see {out / 'report.json'})"
    )


def inspect_command(
    directory: Annotated[Path, typer.Argument(help="a shard set directory")],
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Counts per split and label, feature dims, missing modalities, failures, provenance."""
    from erc.pipeline.inspect import inspect_shards

    try:
        summary = inspect_shards(directory)
    except ErcError as exc:
        raise fail(exc) from None
    if json_output:
        typer.echo(json.dumps(summary, sort_keys=True))
        return
    print_summary(summary)


def print_summary(summary: dict) -> None:
    missing = summary.get("missing_shards") or []
    state = ("complete" if summary["complete"] else
             f"INCOMPLETE: missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (re-run extract to "
             "resume; train/evaluate/compare/predict refuse it without --allow-partial)")
    console.print(f"[bold]{summary['directory']}[/bold]: {summary['dataset']}, "
                  f"{summary['shards']['done']}/{summary['shards']['planned']} shards, {state}")
    labels = Table(title="utterances per split and label")
    splits = sorted(summary["labels"])
    labels.add_column("label")
    for split in splits:
        labels.add_column(split, justify="right")
    for name in list(summary["label_names"] or []) + ["<unlabeled>"]:
        row = [str(summary["labels"][s].get(name, 0)) for s in splits]
        if name != "<unlabeled>" or any(v != "0" for v in row):
            labels.add_row(name, *row)
    labels.add_row("[bold]utterances", *[str(summary["splits"].get(s, 0)) for s in splits])
    labels.add_row("[bold]dialogues", *[str(summary["dialogues"].get(s, 0)) for s in splits])
    console.print(labels)
    dims = Table(title="features")
    for column in ("modality", "dim", "missing"):
        dims.add_column(column)
    for modality, dim in (summary["dims"] or {}).items():
        dims.add_row(modality, str(dim), str(summary["missing"][modality]))
    console.print(dims)
    failures = summary["failures"]
    console.print(f"failures: {failures['count']} ({failures['utterances']} utterances) {failures['by_modality']} "
                  f"{failures.get('by_type', {})}", highlight=False)
    for item in failures["items"][:10]:
        console.print(escape(f"  {item['item']} [{item['modality']}]: {item['error']}"), highlight=False)
    provenance = summary["provenance"]
    console.print(f"config {provenance['config_hash']}; weights: {json.dumps(provenance['weights'])}", highlight=False)


def demo_command(
    out: Annotated[Path, typer.Option(help="where the demo corpus, shards and run go")] = Path("erc-demo"),
    workers: Annotated[int, typer.Option(help="local Dask worker processes")] = 2,
) -> None:
    """Write a small synthetic corpus, extract its features offline, train and evaluate on them."""
    from erc.pipeline.demo import DEMO_MODEL, run_demo
    from erc.pipeline.inspect import inspect_shards

    console.print("[yellow]demo: text through the bundled pretrained MiniLM; faces through RANDOM ResNet-101 weights "
                  "(the visual vectors test the pipeline, they carry no learned meaning)[/yellow]")

    def on_epoch(record: dict) -> None:
        console.print(f"train {DEMO_MODEL} epoch {record['epoch']}: loss {record['train']['total']:.3f}, "
                      f"dev weighted F1 {record['dev']['weighted_f1']:.3f}", highlight=False)

    try:
        with utterance_progress("extract demo") as progress:
            result = run_demo(out, workers=workers, progress=progress, on_epoch=on_epoch)
        print_summary(inspect_shards(result.features))
    except ErcError as exc:
        raise fail(exc) from None
    test = result.training.test
    run = result.training.run_dir
    console.print(
        f"test ({DEMO_MODEL}, best dev epoch {result.training.best_epoch}): weighted F1 {test['weighted_f1']:.3f}, "
        f"accuracy {test['accuracy']:.3f}\n"
        f"corpus: {result.manifest}\nfeatures: {result.features}\nrun: {run} "
        f"(metrics.json, {run / 'confusion_matrix.png'}, {run / 'training_curves.png'})\n"
        f"re-score the checkpoint: erc evaluate --run {run}", highlight=False,
    )
