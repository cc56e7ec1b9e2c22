"""`coca eval zeroshot` and `coca eval retrieval`: benchmarks on your own data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..data.inputs import require_path
from . import app, err_console, stdout_format
from .classify import embed_batches, fail_if_skipped, load_contrastive, require_features, weights_name
from .options import (BatchSizeOption, CaptionKeyOption, ContrastivePretrainedOption, DeviceOption, FormatOption,
                      ImgKeyOption, ModelOption, PrecisionOption, SeparatorOption, TemplatesOption, WorkersOption)

eval_app = typer.Typer(
    no_args_is_help=True,
    help="Benchmark zero-shot classification, image-text retrieval or captioning on your own data.\n\n"
         "\b\nExample: coca eval zeroshot --data imagenet/val --templates imagenet\n"
         "         coca eval retrieval --data pairs.tsv --output results.json",
)
app.add_typer(eval_app, name="eval")

OutputOption = typer.Option(None, "--output", "-o", help="Also write the results to FILE as JSON.")
METRIC_COLUMNS = ("metric", "value")


@eval_app.command("zeroshot")
def zeroshot_command(
    data: Path = typer.Option(..., "--data", "-d", help="Folder with one subfolder of images per class; the "
                              "subfolder names are the class names (_ read as a space)."),
    templates: TemplatesOption = "default",
    output: Optional[Path] = OutputOption,
    output_format: FormatOption = None,
    model: ModelOption = None,
    pretrained: ContrastivePretrainedOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 0,
):
    """Top-1 and top-5 zero-shot accuracy on an image folder (torchvision ImageFolder layout).

    \b
    Example: coca eval zeroshot --data imagenet/val --templates imagenet --output results.json
    """
    require_path(data, "folder")  # before torch is imported
    fmt = stdout_format(output_format)
    check_json_output(output)
    from ..tasks.embeddings import ImageFeatures
    from ..tasks.templates import load_templates
    from ..tasks.zeroshot import build_classifier, read_image_folder, zeroshot_accuracy

    folder = read_image_folder(data)
    prompts = load_templates(templates)
    net, transform, tokenizer = load_contrastive(model, pretrained, device, precision)
    classifier = build_classifier(net, tokenizer, folder.classnames, prompts)
    found = ImageFeatures.concat(embed_batches(net, transform, folder.paths, batch_size, workers))
    require_features(found, len(folder.paths))
    metrics = zeroshot_accuracy(found.features @ classifier, folder.targets_of(found.paths))

    table = Table("images", "classes", "top-1 accuracy", "top-5 accuracy")
    table.add_row(str(len(found.paths)), str(len(folder.classnames)),
                  *(_percent(metrics[f"top{k}_zeroshot_accuracy"]) for k in (1, 5)))
    result = _result("zeroshot_classification", data, net, weights_name(model, pretrained), metrics,
                     images=len(found.paths), classes=len(folder.classnames), skipped=len(found.failures))
    _report(f"zero-shot classification: {data}", table, fmt, result, output)
    fail_if_skipped(len(found.failures), len(folder.paths))


@eval_app.command("retrieval")
def retrieval_command(
    data: Path = typer.Option(..., "--data", "-d", help="CSV/TSV of image paths (relative to its folder) and "
                              "captions; an image may have several rows."),
    img_key: ImgKeyOption = "filepath",
    caption_key: CaptionKeyOption = "title",
    separator: SeparatorOption = None,
    output: Optional[Path] = OutputOption,
    output_format: FormatOption = None,
    model: ModelOption = None,
    pretrained: ContrastivePretrainedOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 0,
):
    """Image→text and text→image Recall@1/5/10, as CLIP_benchmark computes them.

    Image→text: an image counts when any of its captions is among its k best. Text→image: a
    caption counts when its image is among its k best.

    \b
    Example: coca eval retrieval --data pairs.tsv --output results.json
    """
    require_path(data, "file")  # before torch is imported
    fmt = stdout_format(output_format)
    check_json_output(output)
    from ..tasks.embeddings import ImageFeatures, embed_texts
    from ..data.tables import read_pairs
    from ..tasks.retrieval import retrieval_recall

    pairs = read_pairs(data, img_key, caption_key, separator)
    net, transform, tokenizer = load_contrastive(model, pretrained, device, precision)
    found = ImageFeatures.concat(embed_batches(net, transform, pairs.images, batch_size, workers))
    require_features(found, len(pairs.images))
    pairs = pairs.keep(found.paths)  # the captions of unreadable images cannot be scored
    scores = embed_texts(net, tokenizer, pairs.captions) @ found.features.T
    metrics = retrieval_recall(scores, pairs.caption_image, ks=(1, 5, 10))

    table = Table("direction", "R@1", "R@5", "R@10")
    for direction, name in (("image→text", "text_retrieval"), ("text→image", "image_retrieval")):
        table.add_row(direction, *(_percent(metrics[f"{name}_recall@{k}"]) for k in (1, 5, 10)))
    result = _result("zeroshot_retrieval", data, net, weights_name(model, pretrained), metrics,
                     images=len(pairs.images), captions=len(pairs.captions), skipped=len(found.failures))
    _report(f"retrieval: {data} ({len(pairs.images)} images, {len(pairs.captions)} captions)", table, fmt, result,
            output)
    fail_if_skipped(len(found.failures), len(found.paths) + len(found.failures))


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _result(task: str, data: Path, net, weights: str, metrics: dict, **counts) -> dict:
    """CLIP_benchmark's result layout. The model is named by its config, so a weights folder or
    checkpoint given alone still says which model it holds."""
    return {"dataset": str(data), "model": net.config.name, "pretrained": weights,
            "task": task, "metrics": metrics, **counts}


def _report(heading: str, table: Table, fmt: str, result: dict, output: Optional[Path]) -> None:
    """The table to a terminal, else ``result`` as one JSON line (or metric/value rows); with
    --output, ``result`` as a JSON file too."""
    if fmt == "table":
        console = Console()
        console.print(Text(heading, style="bold"), soft_wrap=True)
        console.print(table)
    else:
        counts = [(key, value) for key, value in result.items() if isinstance(value, int)]  # images, skipped, ...
        print_record(fmt, result, [*result["metrics"].items(), *counts])
    if output is not None:
        write_json(output, result)


def print_record(fmt: str, record: dict, rows: list) -> None:
    """One result on stdout: a JSON line, or metric/value rows as CSV/TSV."""
    from ..tasks.output import RecordWriter

    RecordWriter(sys.stdout, fmt, METRIC_COLUMNS).write(record, rows)


def check_json_output(output: Optional[Path]) -> None:
    """An existing --output that is not a results file coca wrote is refused before any model loads."""
    from ..tasks.output import check_replaceable

    check_replaceable(output, "json")


def write_json(output: Path, result: dict) -> None:
    """Whole or not at all (a full disk is one line, exit 1, after the results were printed)."""
    from ..tasks.output import write_json_file

    write_json_file(output, result)
    err_console.print(f"wrote {output}")
