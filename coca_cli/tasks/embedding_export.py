"""Embeddings of a whole collection on disk, in the layout clip-retrieval's inference writes, so
that its index step (autofaiss) and back end read them as their own:

    OUT/img_emb/img_emb_{n}.npy     rows of L2-normalised image embeddings (float16 or float32)
    OUT/text_emb/text_emb_{n}.npy   the same rows' text embeddings
    OUT/metadata/metadata_{n}.parquet (or .jsonl)   one row per embedding row

``n`` is zero-padded to the digits of the part count, as clip-retrieval's writer pads it
(``str(n).zfill(int(log10(parts)) + 1)``), so the names sort in part order. A part is finished
when all its files are there: each is written whole (the metadata last), so a run stopped at any
point leaves no part that looks finished, and the next run redoes only the unfinished ones. A
part whose rows were all left out has no files, only ``metadata/metadata_{n}.empty``.
``OUT/coca-embed.json`` records the model, the inputs and the settings, so that a run with
others is refused instead of mixing embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..data.datasets import dataset_kind
from ..data.inputs import collect_images
from ..data.samples import SkipSample, decode_image, failing_on
from ..data.shards import caption_of, image_of, resolve_shards, tar_samples
from ..data.tables import column_indexes, image_path, read_whole_rows
from ..errors import CocaError, reading
from ..files import atomic_write, claim_folder
from .embeddings import embed_texts, image_features, iter_image_features

MANIFEST = "coca-embed.json"
_FORMAT = "coca-embed/1"
DEFAULT_PART_SIZE = 10 ** 6  # clip-retrieval's write_batch_size
EMBEDDING_FOLDERS = {"image": "img_emb", "text": "text_emb"}
METADATA_FOLDER = "metadata"
MODALITIES = {"image": ("image",), "text": ("text",), "both": ("image", "text")}


# -- what is embedded ------------------------------------------------------------------------------

@dataclass
class Item:
    """One image file of a folder or table, with its caption from a table."""

    image: Path
    caption: Optional[str] = None


@dataclass
class Collection:
    """The inputs, cut into parts: ``items`` (files, a table) in parts of ``part_size`` rows, or
    one part per shard. ``columns`` are the metadata's, the same for every part."""

    kind: str  # "files", "table" or "shards"
    inputs: list[str]  # as given
    items: list[Item] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    part_size: Optional[int] = None
    columns: tuple[str, ...] = ("image_path",)

    @property
    def parts(self) -> int:
        return len(self.shards) if self.kind == "shards" else -(-len(self.items) // self.part_size)

    def part(self, index: int):
        """A shard URL, or the items of part ``index``."""
        if self.kind == "shards":
            return self.shards[index]
        return self.items[index * self.part_size:(index + 1) * self.part_size]

    def digest(self) -> str:
        """Changes when any image, caption or shard does (a file added to a folder too), not when
        the same files are named from another folder."""
        names = ([_absolute(shard) for shard in self.shards] if self.kind == "shards"
                 else [f"{_absolute(str(item.image))}\t{item.caption}" for item in self.items])
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _absolute(name: str) -> str:
    return name if "://" in name or name.startswith("pipe:") else os.path.abspath(name)


def read_collection(inputs: Sequence[str], modality: str, part_size: Optional[int] = None, img_key: str = "filepath",
                    caption_key: str = "title", separator: Optional[str] = None) -> Collection:
    """Image files and folders, one .csv/.tsv table (as `coca train --data` reads it) or webdataset
    shards (a folder of .tar, a .tar, a brace pattern, or several joined by '::'). A table's captions
    go into the metadata whenever it has the column; the text modality needs them."""
    inputs = [str(spec) for spec in inputs]
    kind, texts = input_kind(inputs), "text" in MODALITIES[modality]
    if kind == "files":
        if texts:
            raise CocaError(f"--modality {modality} needs captions, and image files have none: give a table "
                            "(.csv/.tsv) or shards with captions, or --modality image")
        return Collection(kind, inputs, items=[Item(path) for path in collect_images(inputs)],
                          part_size=part_size or DEFAULT_PART_SIZE)
    if kind == "shards":
        if part_size is not None:
            raise CocaError("--part-size is for image files and tables: shards are written one part per shard")
        return Collection(kind, inputs, shards=resolve_shards("::".join(inputs)),
                          columns=("image_path", "caption", "key", "url"))
    table = Path(inputs[0]).expanduser()
    header, rows = read_whole_rows(table, separator)
    captions = texts or caption_key in header
    where = column_indexes(table, header, (img_key, caption_key) if captions else (img_key,),
                           choose="--img-key and --caption-key")
    if not rows:
        raise CocaError(f"{table} has no rows")
    items = [Item(Path(image_path(row[where[0]], table)), row[where[1]].strip() if captions else None)
             for _, row in rows]
    return Collection(kind, inputs, items=items, part_size=part_size or DEFAULT_PART_SIZE,
                      columns=("image_path", "caption") if captions else ("image_path",))


def input_kind(inputs: Sequence[str]) -> str:
    """"table" (one .csv/.tsv), "shards" (each names shards) or "files"; a mix is refused."""
    tables = [spec for spec in inputs if dataset_kind(spec) == "csv"]
    shards = [spec for spec in inputs if _names_shards(spec)]
    if len(tables) == len(inputs) == 1:
        return "table"
    if shards and len(shards) == len(inputs):
        return "shards"
    if tables or shards:
        raise CocaError("give image files and folders, one table (.csv/.tsv) or webdataset shards, not several "
                        "kinds at once")
    return "files"


def _names_shards(spec: str) -> bool:
    folder = Path(spec).expanduser()
    return "::" in spec or spec.endswith(".tar") or (folder.is_dir() and any(folder.glob("*.tar")))


# -- one part --------------------------------------------------------------------------------------

@dataclass
class Part:
    """The embeddings of one part's usable rows and their metadata; ``skipped`` names the rows left
    out and why (files, tables), ``skipped_reasons`` counts them by reason (shards)."""

    records: list[dict]
    features: dict[str, torch.Tensor]  # "image" and/or "text": [len(records), embed_dim]; none without records
    skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped_reasons: Counter = field(default_factory=Counter)


def embed_items(model, transform: Callable, tokenizer: Callable, items: Sequence[Item], modality: str,
                batch_size: int = 32, workers: int = 0, advance: Callable[[int], None] = lambda n: None) -> Part:
    """Embed a part of files or table rows. A row is left out when its image cannot be read
    (image modality) or it has no caption (text modality); ``advance(n)`` after each n rows."""
    towers = MODALITIES[modality]
    part = Part([], {})
    kept, batches = [], []

    def usable(row: int, reason: Optional[str]) -> bool:
        if reason is None and "text" in towers and not items[row].caption:
            reason = "no caption"
        if reason is not None:
            part.skipped.append((str(items[row].image), reason))
        return reason is None

    if "image" in towers:
        start = 0
        for batch in iter_image_features(model, transform, [item.image for item in items], batch_size, workers):
            rows = range(start, start + len(batch.paths) + len(batch.failures))  # the next rows, in order
            start = rows.stop
            loaded, reasons = {path: i for i, path in enumerate(batch.paths)}, dict(batch.failures)
            usable_rows = [row for row in rows if usable(row, reasons.get(items[row].image))]
            if usable_rows:
                batches.append(batch.features[[loaded[items[row].image] for row in usable_rows]])
            kept += usable_rows
            advance(len(rows))
        if batches:
            part.features["image"] = torch.cat(batches)
    else:
        kept = [row for row in range(len(items)) if usable(row, None)]
        advance(len(items))
    if "text" in towers and kept:
        part.features["text"] = embed_texts(model, tokenizer, [items[row].caption for row in kept])
    part.records = [{"image_path": str(items[row].image), "caption": items[row].caption} for row in kept]
    return part


def embed_shard(model, transform: Callable, tokenizer: Callable, url: str, modality: str,
                batch_size: int = 32) -> Part:
    """Embed the samples of one shard, in order; a sample without an image (image modality) or a
    caption (text modality) is left out. The metadata names each sample as clip-retrieval does
    (``image_path`` is its key) with its ``url`` from its .json, if any.

    Raises BrokenShard when the shard is cut short or damaged.
    """
    towers = MODALITIES[modality]
    part = Part([], {})
    images, pending, batches = [], [], []

    def flush():
        batches.append(image_features(model, torch.stack(images), pending))
        images.clear()
        pending.clear()

    for sample in tar_samples(url):
        key = sample["__key__"]
        try:
            caption = caption_of(sample) if "text" in towers else _optional_caption(sample)
            if "image" in towers:
                data = image_of(sample)
                with failing_on(f"sample {key} of {url}"):
                    images.append(transform(decode_image(data)))
                pending.append(key)
        except SkipSample as reason:
            part.skipped_reasons[str(reason)] += 1
            continue
        part.records.append({"image_path": key, "caption": caption, "key": key, "url": _source_url(sample)})
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    if batches:
        part.features["image"] = torch.cat(batches)
    if "text" in towers and part.records:
        part.features["text"] = embed_texts(model, tokenizer, [record["caption"] for record in part.records])
    return part


def _optional_caption(sample: dict) -> Optional[str]:
    try:
        return caption_of(sample)
    except SkipSample:
        return None


def _source_url(sample: dict) -> Optional[str]:
    """The image's source URL from the sample's .json (img2dataset writes it there), else None."""
    try:
        url = json.loads(sample["json"]).get("url") if "json" in sample else None
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) else None


# -- the output folder -----------------------------------------------------------------------------

def metadata_format(requested: str) -> str:
    """parquet or jsonl; auto is parquet when pyarrow is installed."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        if requested == "parquet":
            raise CocaError("--metadata-format parquet needs pyarrow: pip install 'coca-cli[parquet]' "
                            "(or use --metadata-format jsonl)") from None
        return "jsonl"
    return "parquet" if requested == "auto" else requested


class EmbeddingFolder:
    """OUT: its manifest, its parts' file names, and which parts are finished.

    ``settings`` are what must match between runs into one folder (model aside, which is only
    known once it is loaded): the inputs, modality, part size, dtype and metadata format.
    """

    def __init__(self, root: Path, collection: Collection, modality: str, dtype: str, metadata: str):
        self.root, self.collection, self.modality = Path(root), collection, modality
        self.dtype, self.metadata = dtype, metadata
        self.fingerprints: dict[str, str] = {}  # the model's, per tower: known once it is loaded (start)
        self.settings = {"format": _FORMAT, "kind": collection.kind, "inputs": collection.inputs,
                         "rows": len(collection.items) if collection.kind != "shards" else None,
                         "digest": collection.digest(), "modality": modality, "part_size": collection.part_size,
                         "dtype": dtype, "metadata_format": metadata, "parts": collection.parts}

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def files(self, index: int) -> list[Path]:
        """The part's files, the metadata last (written last: its presence means a whole part)."""
        number = str(index).zfill(len(str(self.collection.parts)))  # clip-retrieval: int(log10(parts)) + 1
        folders = [EMBEDDING_FOLDERS[tower] for tower in MODALITIES[self.modality]]
        return ([self.root / folder / f"{folder}_{number}.npy" for folder in folders]
                + [self.root / METADATA_FOLDER / f"{METADATA_FOLDER}_{number}.{self.metadata}"])

    def empty_marker(self, index: int) -> Path:
        """What a finished part without rows leaves instead of its files (``metadata_N.empty``)."""
        return self.files(index)[-1].with_suffix(".empty")

    def finished(self, index: int) -> bool:
        return self.empty_marker(index).is_file() or all(path.is_file() for path in self.files(index))

    def check(self) -> None:
        """Before the model loads: OUT is new or empty, or holds an earlier run of these inputs and
        settings (and nothing else); anything else is refused, exit 2."""
        if not self.manifest.is_file():
            claim_folder(self.root, ())
            return
        claim_folder(self.root, {MANIFEST, *EMBEDDING_FOLDERS.values(), METADATA_FOLDER})
        earlier = self._read_manifest()
        for key, value in self.settings.items():
            if key != "inputs" and earlier.get(key) != value:  # the inputs as typed are for people to read
                what = ("other inputs" if key in ("kind", "rows", "digest")
                        else f"other settings ({key} {earlier.get(key)} there, {value} now)")
                raise CocaError(f"--output {self.root} holds the embeddings of {what}: give the same inputs "
                                "and settings to finish them, or choose a new folder")

    def start(self, fingerprints: dict[str, str]) -> None:
        """Refuse embeddings of another model (exit 2), else write the manifest, before any part."""
        if self.manifest.is_file() and self._read_manifest().get("model") != fingerprints:
            raise CocaError(f"--output {self.root} holds the embeddings of another model: finish them with "
                            "the same --model, --pretrained and --precision, or choose a new folder")
        self.fingerprints = fingerprints
        self.write_manifest()

    def write_manifest(self) -> None:
        done = [index for index in range(self.collection.parts) if self.finished(index)]
        text = json.dumps({**self.settings, "model": self.fingerprints, "finished": done}, indent=1) + "\n"
        atomic_write(self.manifest, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _read_manifest(self) -> dict:
        with reading(self.manifest, "manifest"):
            text = self.manifest.read_text(encoding="utf-8")
        try:
            manifest = json.loads(text)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise CocaError(f"{self.manifest} is not a manifest of coca embed: choose a new --output folder")
        return manifest

    def write(self, index: int, part: Part) -> None:
        """The part's embedding files, then its metadata, each whole or not at all. A part without
        rows gets no files, as in clip-retrieval (embedding-reader, which autofaiss reads with,
        fails on empty ones), only its marker; files an interrupted try left are removed."""
        *embeddings, metadata = self.files(index)
        if not part.records:
            for path in embeddings:
                path.unlink(missing_ok=True)
            atomic_write(self.empty_marker(index), lambda tmp: None)
            return
        for path, tower in zip(embeddings, MODALITIES[self.modality]):
            values = part.features[tower].numpy().astype(self.dtype)
            atomic_write(path, lambda tmp: _save_npy(tmp, values))
        rows = [{column: record.get(column) for column in self.collection.columns} for record in part.records]
        atomic_write(metadata, lambda tmp: _write_metadata(tmp, rows, self.collection.columns, self.metadata))


def _save_npy(path: str, values: np.ndarray) -> None:
    with open(path, "wb") as file:  # np.save given a name would add .npy to the temporary file's
        np.save(file, values)


def _write_metadata(path: str, rows: list[dict], columns: Sequence[str], kind: str) -> None:
    if kind == "jsonl":
        with open(path, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(column, pa.string()) for column in columns])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
