"""Options shared by several commands, declared once (``Annotated`` types for Typer)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model config name or JSON path [default: coca_ViT-L-14, or the config inside --pretrained]")]
ContrastivePretrainedOption = Annotated[Optional[str], typer.Option(
    "--pretrained", "-p", help="Published tag, hf-hub:org/repo, native folder or checkpoint file "
                               "[default: laion2b_s13b_b90k]")]
CaptionPretrainedOption = Annotated[Optional[str], typer.Option(
    "--pretrained", "-p", help="Published tag, hf-hub:org/repo, native folder or checkpoint file "
                               "[default: mscoco_finetuned_laion2b_s13b_b90k]")]
DeviceOption = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps.")]
PrecisionOption = Annotated[str, typer.Option(help="fp32, bf16 or fp16.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOption = Annotated[int, typer.Option(min=0, help="Background processes decoding images.")]
ImgKeyOption = Annotated[str, typer.Option("--img-key", help="Column holding the image paths.")]
CaptionKeyOption = Annotated[str, typer.Option("--caption-key", help="Column holding the captions.")]
SeparatorOption = Annotated[Optional[str], typer.Option(
    "--separator", help="Column separator, one character (\\t for tab) [default: ',' for .csv, tab otherwise].")]


class Format(str, Enum):
    """What results look like on stdout."""

    table = "table"
    jsonl = "jsonl"
    tsv = "tsv"
    csv = "csv"


FormatOption = Annotated[Optional[Format], typer.Option(
    "--format", help="Results on stdout as table, jsonl, tsv or csv [default: a table on a terminal, "
                     "JSON Lines when stdout is a pipe or file].")]
ResultsFileOption = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Write the results to FILE instead of stdout, as .jsonl, .csv or .tsv.")]
TemplatesOption = Annotated[str, typer.Option(
    help="Prompt templates: default ('a photo of a {}.'), imagenet (OpenAI's 80-prompt ensemble) "
         "or a UTF-8 file with one template a line, {} marking the class name.")]

# -- caption generation (model.generate's arguments) ------------------------------------------
GenerationTypeOption = Annotated[str, typer.Option(help="beam_search, top_k or top_p.")]
SeqLenOption = Annotated[Optional[int], typer.Option(
    help="Maximum caption length in tokens (incl. start/end) [default: 30, or the model's limit if lower].")]
MinSeqLenOption = Annotated[int, typer.Option(help="Minimum caption length in tokens.")]
NumBeamsOption = Annotated[int, typer.Option(help="Beams for beam search.")]
NumBeamGroupsOption = Annotated[int, typer.Option(help="Diverse beam search groups (must divide --num-beams).")]
TopKOption = Annotated[int, typer.Option(help="top_k sampling: keep the K most likely tokens (1 = greedy).")]
TopPOption = Annotated[float, typer.Option(help="top_p sampling: keep tokens within this probability mass.")]
TemperatureOption = Annotated[float, typer.Option(help="Sampling temperature.")]
RepetitionPenaltyOption = Annotated[float, typer.Option(help="Penalty for repeated tokens (1.0 = none).")]
SeedOption = Annotated[Optional[int], typer.Option(help="Random seed for sampling.")]

GENERATION_OPTIONS = ("generation_type", "seq_len", "min_seq_len", "num_beams", "num_beam_groups", "top_k", "top_p",
                      "temperature", "repetition_penalty")


def generation_option(name: str, value=None) -> Optional[str]:
    """The generation library's ``spell``: settings named as typed here (``--generation-type top_k``);
    None for the ones the command line does not offer."""
    if name not in GENERATION_OPTIONS:
        return None
    flag = "--" + name.replace("_", "-")
    return flag if value is None else f"{flag} {value}"
