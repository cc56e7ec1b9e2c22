"""`coca classify`, and the pieces every contrastive command shares (model loading, embedding)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..devices import pick_device
from ..errors import CocaError
from . import app, err_console, progress, stdout_format
from .options import (BatchSizeOption, ContrastivePretrainedOption, DeviceOption, FormatOption, ModelOption,
                      PrecisionOption, ResultsFileOption, TemplatesOption, WorkersOption)

# -- shared by classify, retrieve and eval ------------------------------------------------------

def with_defaults(model: Optional[str], pretrained: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """The contrastive commands' (model, pretrained): without --pretrained, the LAION weights."""
    from ..weights.pretrained import default_weights

    return default_weights(model, pretrained, captioning=False)


def weights_name(model: Optional[str], pretrained: Optional[str]) -> str:
    """The weights the contrastive commands load, as results name them."""
    model, pretrained = with_defaults(model, pretrained)
    return pretrained or str(model)


def load_contrastive(model: Optional[str], pretrained: Optional[str], device: str, precision: str):
    """(model, eval transform, tokenizer), on the chosen device and precision."""
    from ..weights.factory import create_model_and_transforms

    model, pretrained = with_defaults(model, pretrained)
    net, _, transform = create_model_and_transforms(model, pretrained, precision=precision, device=pick_device(device))
    return net, transform, model_tokenizer(net, model, pretrained)


def model_tokenizer(net, model: Optional[str], pretrained: Optional[str]):
    """The tokenizer of a loaded model, with its context length: get_tokenizer cannot read that
    for a bare hf-hub: name."""
    from ..weights.factory import get_tokenizer

    return get_tokenizer(model, context_length=net.config.text_cfg.context_length, pretrained=pretrained)


def embed_batches(net, transform, paths: Sequence[Path], batch_size: int, workers: int) -> Iterator:
    """Image feature batches behind a progress bar; each unreadable image is reported as it comes."""
    from ..tasks.embeddings import iter_image_features

    with progress(len(paths), "embedding images") as advance:
        for batch in iter_image_features(net, transform, paths, batch_size, workers):
            for path, reason in batch.failures:
                err_console.print(f"skipped {path}: {reason}")
            advance(len(batch.paths) + len(batch.failures))
            yield batch


def require_features(found, total: int) -> None:
    """Nothing to rank or score when no image at all could be read."""
    if found.features is None:
        raise CocaError(f"none of the {total} images could be read", exit_code=1)


def fail_if_skipped(skipped: int, total: int) -> None:
    """Exit 1 after the results are out when some images could not be read (README: exit codes)."""
    if skipped:
        raise CocaError(f"{skipped} of {total} images could not be read", exit_code=1)


def labels_from(labels: Optional[str], labels_file: Optional[Path]) -> list[str]:
    """Class names from --labels (comma separated) or --labels-file (the caller refuses both)."""
    from ..tasks.templates import read_lines
    from ..tasks.zeroshot import check_classnames

    if labels_file is not None:
        return check_classnames(read_lines(labels_file, "labels file"))
    if labels is None:
        raise CocaError("no labels: pass --labels dog,cat,car or --labels-file FILE")
    return check_classnames([name.strip() for name in labels.split(",") if name.strip()])


@contextmanager
def result_sink(output: Optional[Path], fmt: str, columns: Sequence[str],
                show: Callable[[Console, Any], None]) -> Iterator[Callable[[Any], None]]:
    """Where each result (with ``to_json()`` and ``rows()``) goes as it comes: ``show`` draws it as a
    table on stdout when ``fmt`` is table, else it is a JSON Lines/CSV/TSV record on stdout or in
    ``output``."""
    from ..tasks.output import open_records

    if output is None and fmt == "table":
        console = Console(file=sys.stdout)
        yield lambda result: show(console, result)
        return
    with open_records(output, fmt, columns) as records:
        yield lambda result: records.write(result.to_json(), result.rows())


def check_output_file(output: Optional[Path]) -> None:
    """An --output suffix we cannot write, or an existing file coca did not write, is a usage error
    before any model loads."""
    from ..tasks.output import check_replaceable, file_format

    if output is not None:
        check_replaceable(output, file_format(output))


# -- coca classify -------------------------------------------------------------------------------


@app.command("classify")
def classify_command(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help="Class names, comma separated."),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="UTF-8 file, one class name a line."),
    templates: TemplatesOption = "default",
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Labels shown per image."),
    output_format: FormatOption = None,
    as_json: bool = typer.Option(False, "--json", help="Same as --format jsonl: one object per image."),
    output: ResultsFileOption = None,
    model: ModelOption = None,
    pretrained: ContrastivePretrainedOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 0,
):
    """Zero-shot classification: the most probable of the given labels for each image.

    \b
    Example: coca classify photos/ --labels dog,cat,car
             coca classify img.jpg --labels-file classes.txt --templates imagenet --output labels.csv
    """
    from ..data.inputs import collect_images, require_path

    paths = collect_images(inputs)  # before torch is imported: a typo is reported at once
    if labels is not None and labels_file is not None:
        raise CocaError("give --labels or --labels-file, not both")
    require_path(labels_file, "labels file")
    fmt = stdout_format(output_format, as_json)
    check_output_file(output)
    from ..tasks.templates import load_templates
    from ..tasks.zeroshot import Classification, build_classifier, classify, top_labels

    names = labels_from(labels, labels_file)
    prompts = load_templates(templates)
    net, transform, tokenizer = load_contrastive(model, pretrained, device, precision)
    classifier = build_classifier(net, tokenizer, names, prompts)
    skipped = 0
    with result_sink(output, fmt, Classification.COLUMNS, _show) as emit:
        for batch in embed_batches(net, transform, paths, batch_size, workers):
            skipped += len(batch.failures)
            if batch.features is None:
                continue
            for path, best in zip(batch.paths, top_labels(classify(net, batch.features, classifier), names, top_k)):
                emit(Classification(str(path), best))
    fail_if_skipped(skipped, len(paths))


def _show(console: Console, result) -> None:
    console.print(Text(result.image, style="bold"), soft_wrap=True)
    table = Table("#", "label", "probability")
    for rank, (label, p) in enumerate(result.labels, start=1):
        table.add_row(str(rank), Text(label), f"{p:.4f}")
    console.print(table)
