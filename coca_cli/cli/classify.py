"""`coca classify`, and the pieces every contrastive command shares (model loading, embedding)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import CocaError
from . import app, err_console, pick_device, progress
from .options import (BatchSizeOption, ContrastivePretrainedOption, DeviceOption, ModelOption, PrecisionOption,
                      TemplatesOption, WorkersOption)

# -- shared by classify, retrieve and eval ------------------------------------------------------

def with_defaults(model: Optional[str], pretrained: Optional[str]) -> tuple[Optional[str], str]:
    """Without --pretrained: the LAION weights, not the MSCOCO fine-tune, which captions better
    but has lost much of its zero-shot and retrieval skill."""
    from ..pretrained import DEFAULT_CONTRASTIVE_MODEL, DEFAULT_CONTRASTIVE_PRETRAINED

    if pretrained is None:
        return model or DEFAULT_CONTRASTIVE_MODEL, DEFAULT_CONTRASTIVE_PRETRAINED
    return model, pretrained


def load_contrastive(model: Optional[str], pretrained: Optional[str], device: str, precision: str):
    """(model, eval transform, tokenizer), on the chosen device and precision."""
    from ..factory import create_model_and_transforms, get_tokenizer

    model, pretrained = with_defaults(model, pretrained)
    net, _, transform = create_model_and_transforms(model, pretrained, precision=precision, device=pick_device(device))
    # The context length comes from the loaded model: get_tokenizer cannot read it for a bare hf-hub: name.
    context_length = net.config.text_cfg.context_length
    return net, transform, get_tokenizer(model, context_length=context_length, pretrained=pretrained)


def embed_batches(net, transform, paths: Sequence[Path], batch_size: int, workers: int) -> Iterator:
    """Image feature batches behind a progress bar; each unreadable image is reported as it comes."""
    from ..retrieval import iter_image_features

    with progress(len(paths), "embedding images") as advance:
        for batch in iter_image_features(net, transform, paths, batch_size, workers):
            for path, reason in batch.failures:
                err_console.print(f"skipped {path}: {reason}")
            for _ in range(len(batch.paths) + len(batch.failures)):
                advance()
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
    """Class names from exactly one of --labels (comma separated) and --labels-file."""
    from ..templates import read_lines
    from ..zeroshot import check_classnames

    if labels is not None and labels_file is not None:
        raise CocaError("give --labels or --labels-file, not both")
    if labels_file is not None:
        return check_classnames(read_lines(labels_file, "labels file"))
    if labels is None:
        raise CocaError("no labels: pass --labels dog,cat,car or --labels-file FILE")
    return check_classnames([name.strip() for name in labels.split(",") if name.strip()])


# -- coca classify -------------------------------------------------------------------------------


@app.command("classify")
def classify_command(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help="Class names, comma separated."),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="UTF-8 file, one class name a line."),
    templates: TemplatesOption = "default",
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Labels shown per image."),
    as_json: bool = typer.Option(False, "--json", help="JSON Lines on stdout, one object per image, not tables."),
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
             coca classify img.jpg --labels-file classes.txt --templates imagenet --json
    """
    from ..images import collect_images
    from ..templates import load_templates
    from ..zeroshot import build_classifier, classify, top_labels

    names = labels_from(labels, labels_file)
    prompts = load_templates(templates)
    paths = collect_images(inputs)
    net, transform, tokenizer = load_contrastive(model, pretrained, device, precision)
    classifier = build_classifier(net, tokenizer, names, prompts)
    # Bound before the progress bar starts: on a terminal it swaps sys.stdout for a proxy that
    # prints on stderr, which would send results meant for `> file` to the screen instead.
    stdout = sys.stdout
    console = Console(file=stdout)
    skipped = 0
    for batch in embed_batches(net, transform, paths, batch_size, workers):
        skipped += len(batch.failures)
        if batch.features is None:
            continue
        for path, best in zip(batch.paths, top_labels(classify(net, batch.features, classifier), names, top_k)):
            if as_json:
                predictions = [{"label": label, "probability": p} for label, p in best]
                print(json.dumps({"image": str(path), "predictions": predictions}, ensure_ascii=False), file=stdout,
                      flush=True)
            else:
                console.print(Text(str(path), style="bold"), soft_wrap=True)
                console.print(_table(best))
    fail_if_skipped(skipped, len(paths))


def _table(best: list[tuple[str, float]]) -> Table:
    table = Table("#", "label", "probability")
    for rank, (label, p) in enumerate(best, start=1):
        table.add_row(str(rank), Text(label), f"{p:.4f}")
    return table
