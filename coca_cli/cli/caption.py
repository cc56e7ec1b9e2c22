"""`coca caption`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..devices import pick_device
from ..errors import CocaError
from . import app, command_line, err_console, progress
from .classify import model_tokenizer
from .options import (BatchSizeOption, CaptionPretrainedOption, DeviceOption, GenerationTypeOption, MinSeqLenOption,
                      ModelOption, NumBeamGroupsOption, NumBeamsOption, PrecisionOption, RepetitionPenaltyOption,
                      SeedOption, SeqLenOption, TemperatureOption, TopKOption, TopPOption, WorkersOption,
                      generation_option)


@app.command("caption")
def caption_command(
    ctx: typer.Context,
    inputs: Optional[List[str]] = typer.Argument(None, help="Image files, folders (searched recursively) or globs."),
    data: Optional[str] = typer.Option(None, help="Webdataset shards instead of files: a folder of .tar, a brace "
                                       "pattern or a list joined by '::'; --output is then a folder."),
    gpus: Optional[int] = typer.Option(None, min=1, help="With --data: processes to split the shards over "
                                       "(relaunches through torchrun) [default: all visible GPUs, 1 on CPU]."),
    model: ModelOption = None,
    pretrained: CaptionPretrainedOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    batch_size: BatchSizeOption = 8,
    workers: WorkersOption = 0,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to FILE (.jsonl, .csv, .tsv or .txt); "
                                          "with --data, a folder. An existing file that coca did not write is "
                                          "refused."),
    as_json: bool = typer.Option(False, "--json", help="JSON Lines on stdout instead of path<TAB>caption lines."),
    resume: bool = typer.Option(False, help="Skip images already in --output (shards are always resumed)."),
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
    compile: bool = typer.Option(False, "--compile", help="Run the decoding step under torch.compile (CUDA graphs "
                                 "on a GPU): same captions, faster on long runs once compiled."),
    score: bool = typer.Option(False, "--score", help="Add each caption's image-text score (the cosine similarity "
                               "`coca score` computes) to its result."),
    candidates: int = typer.Option(1, "--candidates", min=1, help="Generate N candidates per image (the default "
                                   "caption and N-1 samples; --seed makes them repeatable) and keep the "
                                   "highest-scoring one; reports its score and the default caption's."),
):
    """Caption images, writing each result as soon as it is ready.

    Lines are path<TAB>caption (stdout and .txt); a backslash, tab, newline or carriage return
    in a path or caption is written as \\\\, \\t, \\n or \\r, so each result is one line.

    \b
    Examples:
      coca caption photos/*.jpg
      coca caption photos/ --output captions.jsonl --resume
      coca caption photos/ --candidates 8 --seed 0 --json
      coca caption --data shards/ --output captions/ --gpus 8
    """
    if data is not None and inputs:
        raise CocaError("give image files or --data shards, not both")
    if data is None and not inputs:
        raise CocaError("give image files, folders or globs to caption (or --data shards)")
    from ..data.inputs import collect_images

    paths = collect_images(inputs) if inputs else []  # before torch is imported: a typo is reported at once
    from ..model.generation import validate_options
    from ..weights.pretrained import default_weights

    generation = dict(generation_type=generation_type, seq_len=seq_len, min_seq_len=min_seq_len, num_beams=num_beams,
                      num_beam_groups=num_beam_groups, top_k=top_k, top_p=top_p, temperature=temperature,
                      repetition_penalty=repetition_penalty)
    validate_options(spell=generation_option, **generation)
    model, pretrained = default_weights(model, pretrained, captioning=True)
    load = dict(model_name=model, pretrained=pretrained, precision=precision, compile=compile)
    scoring = dict(score=score or candidates > 1, candidates=candidates)
    if data is not None:
        if output is None:
            raise CocaError("--data needs --output DIR: one .jsonl file per shard is written there")
        if output.exists() and not output.is_dir():
            raise CocaError(f"--output {output} is a file; with --data it is the folder for one .jsonl per shard")
        from ..train.distributed import default_processes, launched, relaunch

        nproc = gpus or default_processes()
        if nproc > 1 and not launched():
            from ..weights.factory import prefetch

            prefetch(model, pretrained)  # one line (and one download) here, not one in every process
            return relaunch(command_line(ctx, drop=("gpus",)), nproc)
        return _caption_shards(data, output, device, batch_size, seed, load, generation, scoring)
    return _caption_files(paths, output, as_json, resume, device, batch_size, workers, seed, load, generation,
                          scoring)


def _load(device: str, seed: Optional[int], load: dict, generation: dict, scoring: dict):
    """(model, transform, caption_batch's options: the seeded generator or None, the generation
    settings fitted to the model and, to score the captions, the model's tokenizer and candidates)."""
    import torch

    from ..weights.factory import create_model_and_transforms

    from ..model.generation import check_compile, fit_to_model

    load = dict(load)
    compile = load.pop("compile")
    if compile:
        try:
            check_compile(torch.device(device))
        except ValueError as e:
            raise CocaError(f"--{e}") from None
    net, _, transform = create_model_and_transforms(device=device, **load)
    generator = torch.Generator(device=next(net.parameters()).device).manual_seed(seed) if seed is not None else None
    options = {**fit_to_model(net, generation, spell=generation_option), "compile": compile, "generator": generator}
    if scoring["score"]:
        options.update(tokenizer=model_tokenizer(net, load["model_name"], load["pretrained"]),
                       candidates=scoring["candidates"])
    return net, transform, options


def _caption_files(paths, output, as_json, resume, device, batch_size, workers, seed, load, generation, scoring):
    from ..tasks.captioning import CaptionWriter, caption_columns, caption_images

    writer = CaptionWriter(output, as_json=as_json, resume=resume, columns=caption_columns(**scoring))
    if writer.earlier.cut_line:
        err_console.print(f"warning: line {writer.earlier.cut_line} of {output} was left unfinished by an interrupted "
                          "run: it is dropped and its image captioned again")
    todo = [p for p in paths if str(p) not in writer.done]
    if not todo:
        writer.close()
        err_console.print(f"all {len(paths)} images are already captioned in {output}")
        return
    net, transform, options = _load(pick_device(device), seed, load, generation, scoring)
    failed = 0
    with writer, progress(len(todo), "captioning") as advance:
        for path, caption, reason in caption_images(net, transform, todo, batch_size, workers, **options):
            if caption is None:
                failed += 1
                err_console.print(f"skipped {path}: {reason}")
            else:
                writer.write(str(path), caption)
            advance()
    if failed:
        raise CocaError(f"{failed} of {len(todo)} images could not be captioned", exit_code=1)


def _caption_shards(data, output, device, batch_size, seed, load, generation, scoring):
    """This process's share of the shards; under torchrun or SLURM each rank takes every N-th shard."""
    from ..data.shards import BrokenShard, resolve_shards
    from ..train.distributed import process_place, resolve_device
    from ..tasks.recaption import caption_shard, my_shards

    rank, world_size, local_rank = process_place()
    shards = resolve_shards(data)
    todo = my_shards(shards, output, rank, world_size)
    if not todo:
        err_console.print(f"all {len(shards)} shards are already captioned in {output}")
        return
    net, transform, options = _load(resolve_device(device, local_rank, world_size > 1), seed, load, generation,
                                    scoring)
    broken = 0
    for shard in todo:
        try:
            report = caption_shard(net, transform, shard, output, batch_size, **options)
        except BrokenShard as err:
            broken += 1
            err_console.print(f"{err}: no captions written for it")
            continue
        err_console.print(report.line("captioned"))
    if broken:
        raise CocaError(f"{broken} of {len(todo)} shards could not be read whole; run again to retry them", exit_code=1)
