"""`coca eval captions`: BLEU, METEOR, ROUGE-L, CIDEr and SPICE as the COCO caption evaluation computes them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..data.inputs import require_path
from ..devices import pick_device
from ..errors import CocaError
from . import err_console, progress, stdout_format
from .evaluate import check_json_output, eval_app, print_record, write_json
from .options import (BatchSizeOption, CaptionKeyOption, CaptionPretrainedOption, DeviceOption, FormatOption,
                      GenerationTypeOption, ImgKeyOption, MinSeqLenOption, ModelOption, NumBeamGroupsOption,
                      NumBeamsOption, PrecisionOption, RepetitionPenaltyOption, SeedOption, SeparatorOption,
                      SeqLenOption, TemperatureOption, TopKOption, TopPOption, WorkersOption, generation_option)


def captions_command(
    data: Path = typer.Option(..., "--data", "-d", help="CSV/TSV of image paths (relative to its folder) and "
                              "reference captions, several rows per image (coca prepare-coco writes them)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Score these captions instead of "
                                               "generating them: JSON Lines with fields image and caption (or "
                                               "the .csv/.txt that coca caption --output writes). No model."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the results, with every "
                                          "image's caption, references and scores, to FILE as JSON."),
    output_format: FormatOption = None,
    img_key: ImgKeyOption = "filepath",
    caption_key: CaptionKeyOption = "title",
    separator: SeparatorOption = None,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images of --data."),
    java_metrics: bool = typer.Option(True, "--java-metrics/--no-java-metrics", help="METEOR and SPICE run "
                                      "pycocoevalcap's Java programs (when it and java are installed); "
                                      "--no-java-metrics skips them."),
    model: ModelOption = None,
    pretrained: CaptionPretrainedOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    batch_size: BatchSizeOption = 8,
    workers: WorkersOption = 0,
    generation_type: GenerationTypeOption = "beam_search",
    seq_len: SeqLenOption = None,
    min_seq_len: MinSeqLenOption = 5,
    num_beams: NumBeamsOption = 6,
    num_beam_groups: NumBeamGroupsOption = 3,
    top_k: TopKOption = 1,
    top_p: TopPOption = 0.1,
    temperature: TemperatureOption = 1.0,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: SeedOption = None,
):
    """Caption every image of --data (or read --predictions) and score against all its references.

    Captions are tokenised as the COCO caption evaluation does; the table shows scores x100
    (as papers print them), the JSON pycocoevalcap's own scale (CIDEr 1.253 = 125.3).

    \b
    Example: coca eval captions --data coco/karpathy_test.tsv --output results.json
             coca eval captions --data coco/karpathy_test.tsv --predictions captions.jsonl
    """
    require_path(data, "file")  # before torch is imported
    require_path(predictions, "file")
    from ..tasks.caption_eval import evaluate_captions, match_predictions, metric_rows, read_predictions, read_references

    if predictions is not None and (pretrained is not None or model is not None):
        raise CocaError("--predictions scores existing captions: drop --model/--pretrained")
    fmt = stdout_format(output_format)
    check_json_output(output)
    references = read_references(data, img_key, caption_key, separator)
    references = references.first(limit)
    failed = 0
    generation = None
    if predictions is not None:
        captions, unmatched = match_predictions(references, read_predictions(predictions), predictions.parent)
        if unmatched:
            where = f"the first {limit} images of {data}" if limit else str(data)
            err_console.print(f"{len(unmatched)} captions in {predictions} are for images not in {where} (e.g. "
                              f"{unmatched[0]}): ignored")
    else:
        from ..model.generation import validate_options

        generation = dict(generation_type=generation_type, seq_len=seq_len, min_seq_len=min_seq_len,
                          num_beams=num_beams, num_beam_groups=num_beam_groups, top_k=top_k, top_p=top_p,
                          temperature=temperature, repetition_penalty=repetition_penalty)
        validate_options(spell=generation_option, **generation)  # before the model loads
        from ..weights.pretrained import default_weights

        model, pretrained = default_weights(model, pretrained, captioning=True)
        captions, failed, model, generation = _generate(references, model, pretrained, device, precision,
                                                        batch_size, workers, seed, generation)
    missing = len([p for p in references.images if p not in captions]) if predictions is not None else 0
    result = evaluate_captions(references, captions, java=java_metrics)

    summary = {"dataset": str(data), "task": "captioning", "model": model, "pretrained": pretrained,
               "predictions": str(predictions) if predictions is not None else None, "generation": generation,
               "images": len(result["per_image"]), "metrics": result["metrics"], "unavailable": result["unavailable"]}
    if fmt == "table":
        table = Table("metric", "score (x100)")
        for name, value in metric_rows(result["metrics"]):
            table.add_row(name, value)
        console = Console()
        console.print(Text(f"captioning: {data} ({len(result['per_image'])} images)", style="bold"), soft_wrap=True)
        console.print(table)
        for name, reason in result["unavailable"].items():
            console.print(f"{name} unavailable: {reason}")
    else:
        print_record(fmt, summary, [*result["metrics"].items(), ("images", summary["images"])])
    if len(result["per_image"]) == 1:
        err_console.print("note: CIDEr weighs n-grams by how rare they are among the images scored; with one image "
                          "it is always 0")
    if output is not None:
        write_json(output, {**summary, "per_image": result["per_image"]})
    if failed:
        raise CocaError(f"{failed} of {len(references.images)} images could not be captioned", exit_code=1)
    if missing:
        raise CocaError(f"{missing} of {len(references.images)} images in {data} have no caption in {predictions}",
                        exit_code=1)


def _generate(references, model, pretrained, device, precision, batch_size, workers, seed, generation):
    """({image: caption}, number of images that could not be read, model name, settings used)."""
    import torch

    from ..tasks.captioning import caption_images
    from ..weights.factory import create_model_and_transforms
    from ..model.generation import fit_to_model

    net, _, transform = create_model_and_transforms(model, pretrained, precision=precision, device=pick_device(device))
    generation = fit_to_model(net, generation, spell=generation_option)
    generator = torch.Generator(device=next(net.parameters()).device).manual_seed(seed) if seed is not None else None
    captions, failed = {}, 0
    with progress(len(references.images), "captioning") as advance:
        for path, caption, reason in caption_images(net, transform, references.images, batch_size, workers,
                                                    generator=generator, **generation):
            if caption is None:
                failed += 1
                err_console.print(f"skipped {path}: {reason}")
            else:
                captions[path] = caption.caption
            advance()
    if not captions:
        raise CocaError(f"none of the {len(references.images)} images could be captioned", exit_code=1)
    return captions, failed, net.config.name, generation


eval_app.command("captions")(captions_command)
