"""`coca embed`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from ..devices import pick_device
from ..errors import CocaError
from . import app, command_line, err_console, progress
from .classify import load_contrastive, with_defaults
from .options import (BatchSizeOption, CaptionKeyOption, ContrastivePretrainedOption, DeviceOption, ImgKeyOption,
                      ModelOption, PrecisionOption, SeparatorOption, WorkersOption)


class Modality(str, Enum):
    image = "image"
    text = "text"
    both = "both"


class Dtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


class MetadataFormat(str, Enum):
    auto = "auto"
    parquet = "parquet"
    jsonl = "jsonl"


@app.command("embed")
def embed_command(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(..., help="Image files, folders (searched recursively) or globs; one "
                                       ".csv/.tsv table (as `coca train --data` reads it); or webdataset shards "
                                       "(a folder of .tar, a .tar, a brace pattern or a list joined by '::')."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for img_emb/, text_emb/, metadata/ and "
                                "coca-embed.json: new, empty, or an unfinished run of the same inputs to go on with."),
    modality: Modality = typer.Option(Modality.image, help="Embed the images, the texts (captions of a table or "
                                      "shards) or both."),
    part_size: Optional[int] = typer.Option(None, "--part-size", min=1, help="Rows per part (files and tables; "
                                            "shards: one part each) [default: 1000000]."),
    dtype: Dtype = typer.Option(Dtype.float16, help="float16 or float32 embeddings."),
    metadata_format: MetadataFormat = typer.Option(MetadataFormat.auto, "--metadata-format", help="Metadata as "
                                                   "parquet, jsonl, or auto: parquet when pyarrow is installed."),
    gpus: Optional[int] = typer.Option(None, min=1, help="Processes to split the parts over (relaunches through "
                                       "torchrun) [default: all visible GPUs, 1 on CPU]."),
    img_key: ImgKeyOption = "filepath",
    caption_key: CaptionKeyOption = "title",
    separator: SeparatorOption = None,
    model: ModelOption = None,
    pretrained: ContrastivePretrainedOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 0,
):
    """Embed a collection's images and/or texts into .npy parts with metadata, in the layout
    clip-retrieval writes, for its index step (autofaiss) or your own search.

    Rows are L2-normalised, the same vectors `coca retrieve` and `coca score` use. A stopped run
    goes on where it was when run again; another model or other inputs into the same --output are
    refused. Under torchrun (several machines), each process takes its share of the parts.

    \b
    Examples:
      coca embed photos/ --output embeddings/
      coca embed pairs.csv --output embeddings/ --modality both --part-size 100000
      coca embed shards/ --output embeddings/ --modality both --gpus 8
    """
    from ..tasks.embedding_export import EmbeddingFolder, metadata_format as resolve_format, read_collection

    collection = read_collection(inputs, modality.value, part_size, img_key, caption_key, separator)
    folder = EmbeddingFolder(output, collection, modality.value, dtype.value, resolve_format(metadata_format.value))
    folder.check()  # before the model loads or processes start: never mix runs, never write into others' files
    from ..train.distributed import default_processes, launched, relaunch

    nproc = gpus or default_processes()
    if nproc > 1 and not launched():
        from ..weights.factory import prefetch

        prefetch(*with_defaults(model, pretrained))  # one line (and one download) here, not one in every process
        return relaunch([*command_line(ctx, drop=("gpus",)), "--", *inputs], nproc)
    return _embed(folder, model, pretrained, device, precision, batch_size, workers)


def _embed(folder, model, pretrained, device, precision, batch_size, workers):
    """This process's share of the unfinished parts (every N-th under torchrun); the first process
    writes the manifest before any part and again at the end, and reports for all."""
    import torch

    from ..train.distributed import World, cleanup, init, launched

    world = init(device) if launched() else World(device=torch.device(pick_device(device)))
    try:
        _embed_share(folder, world, *load_contrastive(model, pretrained, str(world.device), precision), batch_size,
                     workers)
    finally:
        cleanup(world)


def _embed_share(folder, world, net, transform, tokenizer, batch_size, workers):
    from ..tasks.embedding_export import MODALITIES
    from ..tasks.retrieval import model_fingerprint
    from ..train.distributed import all_gather_object, broadcast_object

    fingerprints = {tower: model_fingerprint(net, tower="visual" if tower == "image" else "text")
                    for tower in MODALITIES[folder.modality]}
    refusal = None
    if world.is_master:
        try:
            folder.start(fingerprints)
        except CocaError as err:
            refusal = str(err)
    refusal = broadcast_object(refusal, world)  # received once the manifest is written: before any part
    if refusal:
        raise CocaError(refusal)
    parts = folder.collection.parts
    todo = [index for index in range(world.rank, parts, world.world_size) if not folder.finished(index)]
    tallies = all_gather_object(_embed_parts(folder, todo, net, transform, tokenizer, batch_size, workers), world)
    if not world.is_master:
        return
    folder.write_manifest()
    embedded, skipped, broken, attempted = (sum(column) for column in zip(*tallies))
    if not attempted:
        err_console.print(f"all {parts} parts are already embedded in {folder.root}")
        return
    earlier = f" ({parts - attempted} of {parts} were done before)" if attempted < parts else ""
    err_console.print(f"embedded {embedded} rows into {attempted - broken} parts{earlier}: wrote {folder.root}")
    if broken:
        raise CocaError(f"{broken} of {attempted} shards could not be read whole; run again to retry them",
                        exit_code=1)
    if skipped:
        noun = "images" if folder.collection.kind == "files" else "rows"
        raise CocaError(f"{skipped} of {embedded + skipped} {noun} could not be embedded", exit_code=1)


def _embed_parts(folder, todo, net, transform, tokenizer, batch_size, workers) -> tuple[int, int, int, int]:
    """Embed and write the parts ``todo``: (rows embedded, rows of files or tables left out, shards
    cut short or damaged, parts tried). Skipped rows are reported as `coca score` reports them: each
    file or table row on its own line, a shard's by reason on the shard's line."""
    from ..data.shards import BrokenShard
    from ..tasks.embedding_export import embed_items, embed_shard
    from ..tasks.recaption import ShardReport

    collection = folder.collection
    shards = collection.kind == "shards"
    embedded = skipped = broken = 0
    total = len(todo) if shards else sum(len(collection.part(index)) for index in todo)
    with progress(total, "embedding shards" if shards else "embedding") as advance:
        for index in todo:
            source = collection.part(index)
            if shards:
                try:
                    part = embed_shard(net, transform, tokenizer, source, folder.modality, batch_size)
                except BrokenShard as err:
                    broken += 1
                    err_console.print(f"{err}: no part written for it")
                    continue
                finally:
                    advance(1)
                err_console.print(ShardReport(source, len(part.records), part.skipped_reasons).line("embedded"))
            else:
                part = embed_items(net, transform, tokenizer, source, folder.modality, batch_size, workers, advance)
            for name, reason in part.skipped:
                err_console.print(f"skipped {name}: {reason}")
            folder.write(index, part)
            embedded += len(part.records)
            skipped += len(part.skipped)
    return embedded, skipped, broken, len(todo)
