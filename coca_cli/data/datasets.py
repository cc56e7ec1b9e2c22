"""Training data: image-caption pairs from CSV/TSV tables or webdataset tar shards.

Both kinds yield micro-batches ``Batch(images, texts, skipped)`` for this rank. A sample whose
image cannot be decoded or that has no caption is skipped and counted, never fatal.

Determinism (what makes ``--resume`` exact and one process equal to many):

* every sample's augmentation is drawn from its own seed (run seed, epoch, sample), so it
  does not depend on which process or loader worker decodes it;
* CSV: each epoch is a seeded permutation cut into *global* batches of ``batch_size x
  world_size x accum_freq``; rank r reads its slice of each, so the samples of an optimizer
  step are the same for any number of processes, and the position is just the step;
* shards: each (rank, worker) reads its own seeded stream of shards; the position is the
  number of raw samples each stream has handed out (checkpointed, replayed on resume without
  decoding). With ``--dataset-resampled`` shards are drawn with replacement and a resumed
  epoch starts a fresh stream instead.

Shards are read with the standard library's ``tarfile`` following webdataset's layout (files
sharing a key up to the first dot of their name form one sample: ``0001.jpg``, ``0001.txt``),
from local paths, ``http(s)://`` URLs or ``pipe:COMMAND`` (e.g. ``pipe:aws s3 cp s3://b/x.tar -``).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import subprocess
import tarfile
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..errors import CocaError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "json")
JSON_CAPTION_FIELDS = ("caption", "text", "txt", "captions")  # "captions": a list, the first is used
MAX_SUBSTITUTIONS = 64  # CSV: how far to look for a readable sample in place of a broken one


@dataclass
class DataConfig:
    data: str
    dataset_type: str = "auto"  # auto, csv, webdataset
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: Optional[str] = None  # None: ',' for .csv, tab otherwise (open_clip's default)
    num_samples: Optional[int] = None  # samples per epoch; needed for shards without sizes.json
    resampled: bool = False
    workers: int = 0
    batch_size: int = 64  # per process
    seed: int = 0
    shuffle_buffer: int = 1000


@dataclass
class Batch:
    images: torch.Tensor
    texts: torch.Tensor
    skipped: Counter = field(default_factory=Counter)  # reason -> samples skipped while making it
    origin: Optional[tuple[int, int]] = None  # shards: (worker, raw samples that worker has read)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return Batch(self.images.pin_memory(), self.texts.pin_memory(), self.skipped, self.origin)


# -- sources -------------------------------------------------------------------------------------

def dataset_kind(spec: str, dataset_type: str = "auto") -> str:
    if dataset_type in ("csv", "webdataset"):
        return dataset_type
    if dataset_type != "auto":
        raise CocaError(f"unknown dataset type '{dataset_type}' (choose from auto, csv, webdataset)")
    if re.search(r"\.(csv|tsv)$", spec, re.IGNORECASE):
        return "csv"
    return "webdataset"


def expand_braces(pattern: str) -> list[str]:
    """``train-{0000..0002}.tar`` -> three names; ``{a,b}`` alternatives too (nested allowed)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(head + item + tail)]


def _is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://"))


def resolve_shards(spec: str) -> list[str]:
    """Shard URLs from a folder, a tar file, a brace pattern, or several of those joined by ``::``."""
    shards: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split("::"))):
        for name in expand_braces(part):
            if _is_remote(name):
                shards.append(name)
                continue
            path = Path(name).expanduser()
            if path.is_dir():
                found = sorted(str(p) for p in path.glob("*.tar"))
                if not found:
                    raise CocaError(f"no .tar shards in {path}")
                shards += found
            elif path.is_file():
                shards.append(str(path))
            else:
                raise CocaError(f"training data not found: {name}")
    if not shards:
        raise CocaError(f"no shards in '{spec}'")
    return shards


def shard_sizes(shards: Sequence[str]) -> Optional[int]:
    """Total samples from the ``sizes.json`` files beside the shards (open_clip's convention)."""
    total, cache = 0, {}
    for shard in shards:
        if _is_remote(shard):
            return None
        folder = Path(shard).parent
        if folder not in cache:
            sizes = folder / "sizes.json"
            try:
                cache[folder] = json.loads(sizes.read_text()) if sizes.is_file() else None
            except (OSError, ValueError):
                cache[folder] = None
        if not cache[folder] or Path(shard).name not in cache[folder]:
            return None
        total += int(cache[folder][Path(shard).name])
    return total


# -- decoding one sample -------------------------------------------------------------------------

class SkipSample(Exception):
    """A sample that cannot be used; the message is the reason it is counted under."""


def decode_image(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return image
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure means this sample is unusable
        raise SkipSample("unreadable image") from None


@contextlib.contextmanager
def failing_on(sample: str):
    """An unexpected error while preparing a sample names the sample: from a loader worker it would
    otherwise arrive as a traceback about the worker. Unusable samples (SkipSample) pass through."""
    try:
        yield
    except (SkipSample, CocaError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - reported whole, in one line
        raise CocaError(f"failed on {sample}: {type(err).__name__}: {err}", exit_code=1) from None


def image_of(sample: dict) -> bytes:
    """The encoded image of a shard sample, under the first of IMAGE_KEYS it has."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise SkipSample("no image")
    return sample[key]


def caption_of(sample: dict) -> str:
    for key in CAPTION_KEYS:
        if key not in sample:
            continue
        raw = sample[key]
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            if key == "json":
                obj = json.loads(text)
                text = next((obj[f] for f in JSON_CAPTION_FIELDS if isinstance(obj, dict) and obj.get(f)), "")
                if isinstance(text, list):
                    text = next((t for t in text if isinstance(t, str) and t.strip()), "")
        except (UnicodeDecodeError, ValueError):
            raise SkipSample("unreadable caption") from None
        if isinstance(text, str) and text.strip():
            return text.strip()
    raise SkipSample("no caption")


def seeded(transform: Callable, image, seed: int):
    """Apply a random transform with its own seed, leaving the process's generators untouched."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            return transform(image)
        finally:
            random.setstate(state)


def sample_seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (1 << 62)
    return value


# -- CSV / TSV -----------------------------------------------------------------------------------

def column_separator(path: Path, separator: Optional[str] = None) -> str:
    """The separator given (``\\t`` or ``tab`` spelled out for a tab), else by suffix: ',' for .csv,
    tab otherwise (open_clip's default)."""
    if separator is None:
        return "," if Path(path).suffix.lower() == ".csv" else "\t"
    return "\t" if separator in ("\\t", "tab") else separator


def read_table(path: str, img_key: str, caption_key: str, separator: Optional[str]) -> tuple[list[str], list]:
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise CocaError(f"data file not found: {path}")
    sep = column_separator(file, separator)
    try:
        table = pd.read_csv(file, sep=sep, dtype=str, keep_default_na=False,
                            engine="python" if len(sep) > 1 else "c")
    except UnicodeDecodeError as err:
        raise CocaError(f"{file} is not UTF-8 text (byte {err.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise CocaError(f"cannot read {file} as a table: {str(err).splitlines()[0] if str(err) else err}") from None
    missing = [k for k in (img_key, caption_key) if k not in table.columns]
    if missing:
        raise CocaError(f"{file} has no column {', '.join(repr(m) for m in missing)} (columns: "
                        f"{', '.join(map(str, table.columns))}; choose with --csv-img-key/--csv-caption-key)")
    if len(table) == 0:
        raise CocaError(f"{file} has no rows")
    base = file.parent
    paths = []
    for name in table[img_key].tolist():
        p = Path(name).expanduser()
        paths.append(str(p if p.is_absolute() or p.exists() else base / p))  # relative to cwd, else to the table
    return paths, table[caption_key].tolist()


class CsvSamples(Dataset):
    """Items are (index, epoch) pairs; a broken sample is replaced by the next readable one."""

    def __init__(self, paths: list[str], captions: list, transform: Callable, seed: int):
        self.paths, self.captions, self.transform, self.seed = paths, captions, transform, seed

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, epoch: int):
        caption = self.captions[index]
        if not isinstance(caption, str) or not caption.strip():
            raise SkipSample("no caption")
        try:
            data = Path(self.paths[index]).read_bytes()
        except OSError:
            raise SkipSample("unreadable image") from None
        with failing_on(self.paths[index]):
            image = decode_image(data)
            return seeded(self.transform, image, sample_seed(self.seed, epoch, index)), caption.strip()

    def __getitem__(self, item):
        index, epoch = item
        skipped: Counter = Counter()
        for attempt in range(MAX_SUBSTITUTIONS):
            try:
                image, caption = self.load((index + attempt) % len(self.paths), epoch)
                return image, caption, skipped
            except SkipSample as why:
                skipped[str(why)] += 1
        raise CocaError(f"{MAX_SUBSTITUTIONS} unusable samples in a row from row {index} of the table "
                        f"({', '.join(f'{n} {k}' for k, n in skipped.items())})")


class GlobalBatches(torch.utils.data.Sampler):
    """This rank's micro-batches: its slice of each global batch of a seeded permutation."""

    def __init__(self, size: int, num_samples: int, batch_size: int, rank: int, world_size: int, accum_freq: int,
                 seed: int, epoch: int, start_step: int, sequential: bool = False):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.epoch, self.sequential = seed, epoch, sequential
        self.micro = batch_size * world_size  # samples in one global micro-batch
        self.steps = num_samples // (self.micro * accum_freq)
        self.first, self.last = start_step * accum_freq, self.steps * accum_freq

    def __len__(self) -> int:
        return self.last - self.first

    def __iter__(self):
        if self.sequential:
            order = torch.arange(self.size)
        else:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(sample_seed(self.seed, self.epoch)))
        for m in range(self.first, self.last):
            start = m * self.micro + self.rank * self.batch_size
            yield [(i, self.epoch) for i in order[start:start + self.batch_size].tolist()]


def _collate(tokenizer):
    def collate(items):
        skipped: Counter = Counter()
        for *_, s in items:
            skipped.update(s)
        return Batch(torch.stack([i for i, _, _ in items]), tokenizer([c for _, c, _ in items]), skipped)
    return collate


# -- webdataset shards ---------------------------------------------------------------------------

@contextlib.contextmanager
def open_stream(url: str):
    """A readable byte stream: a local file, an http(s) URL or a ``pipe:`` command's output."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            proc.wait()
    elif url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=60) as response:
            yield response
    else:
        with open(url, "rb") as f:
            yield f


def tar_samples(url: str, problems: Counter) -> Iterator[dict]:
    """Samples of one shard: {'__key__': key, '__url__': url, ext: bytes, ...}; a broken shard ends early, counted."""
    current: dict = {}
    try:
        with open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current["__key__"], current["__url__"] = key, url
                current[ext.lower()] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as err:
        problems[f"unreadable shard ({type(err).__name__})"] += 1
    if current:
        yield current


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: keep ``size`` items, hand out a random one as each new one arrives."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Endless micro-batches of one epoch for this rank, one stream per loader worker."""

    def __init__(self, shards: list[str], transform: Callable, tokenizer, cfg: DataConfig, rank: int,
                 world_size: int, epoch: int = 0, resume: Optional[dict] = None, restart: int = 0):
        self.shards, self.transform, self.tokenizer, self.cfg = shards, transform, tokenizer, cfg
        self.rank, self.world_size, self.epoch, self.restart = rank, world_size, epoch, restart
        self.resume = resume or {}  # {"read": {worker: raw samples}, "next": worker}

    def raw_samples(self, role: int, roles: int, problems: Counter) -> Iterator[dict]:
        cfg, tag = self.cfg, f"{self.cfg.seed}-{self.epoch}-{self.restart}"
        if cfg.resampled:
            rng = random.Random(f"{tag}-{role}")
            misses = 0  # shards in a row that gave nothing
            while True:
                got = False
                for sample in tar_samples(rng.choice(self.shards), problems):
                    got = True
                    yield sample
                misses = 0 if got else misses + 1
                if misses > 2 * len(self.shards) + 10:
                    raise CocaError(f"no samples in {misses} shards drawn in a row: {', '.join(self.shards[:3])}...")
        for n_pass in range(1 << 62):  # loop over the shards so every rank can fill its steps
            order = list(self.shards)
            random.Random(f"{tag}-pass{n_pass}").shuffle(order)
            found = False
            if len(order) >= roles:
                for url in order[role::roles]:
                    for sample in tar_samples(url, problems):
                        found = True
                        yield sample
            else:  # fewer shards than streams: split by sample instead
                count = 0
                for url in order:
                    for sample in tar_samples(url, problems):
                        if count % roles == role:
                            found = True
                            yield sample
                        count += 1
            if not found:
                raise CocaError(f"no samples in the shards for stream {role} of {roles}: {', '.join(order[:3])}...")

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        local = (worker + int(self.resume.get("next", 0))) % workers  # continue the round-robin where it stopped
        role, roles = self.rank * workers + local, self.world_size * workers
        skip = 0 if self.cfg.resampled else int(self.resume.get("read", {}).get(local, 0))
        problems: Counter = Counter()  # since the last batch; shared with the shard reader
        rng = random.Random(f"{self.cfg.seed}-{self.epoch}-{self.restart}-{role}-shuffle")
        raw = 0
        images, captions = [], []
        for sample in shuffled(self.raw_samples(role, roles, problems), self.cfg.shuffle_buffer, rng):
            raw += 1
            if raw <= skip:
                continue
            try:
                caption = caption_of(sample)
                data = image_of(sample)
                with failing_on(f"sample {sample['__key__']} of {sample['__url__']}"):
                    image = seeded(self.transform, decode_image(data),
                                   sample_seed(self.cfg.seed, self.epoch, self.restart, role, raw))
            except SkipSample as why:
                problems[str(why)] += 1
                continue
            images.append(image)
            captions.append(caption)
            if len(images) == self.cfg.batch_size:
                yield Batch(torch.stack(images), self.tokenizer(captions), Counter(problems), origin=(local, raw))
                images, captions = [], []
                problems.clear()


# -- what training iterates ----------------------------------------------------------------------

class TrainData:
    """Micro-batches for one rank, epoch by epoch, with a position that can be checkpointed."""

    def __init__(self, cfg: DataConfig, transform: Callable, tokenizer, rank: int = 0, world_size: int = 1,
                 accum_freq: int = 1, pin_memory: bool = False):
        self.cfg, self.transform, self.tokenizer, self.pin_memory = cfg, transform, tokenizer, pin_memory
        self.rank, self.world_size, self.accum_freq = rank, world_size, accum_freq
        self.kind = dataset_kind(cfg.data, cfg.dataset_type)
        if self.kind == "csv":
            paths, captions = read_table(cfg.data, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
            self.samples = CsvSamples(paths, captions, transform, cfg.seed)
            self.num_samples = min(len(paths), cfg.num_samples or len(paths))
        else:
            self.shards = resolve_shards(cfg.data)
            self.num_samples = cfg.num_samples or shard_sizes(self.shards)
            if not self.num_samples:
                raise CocaError("the number of training samples is unknown: pass --train-num-samples "
                                "(or put a sizes.json beside the shards)")
        global_batch = cfg.batch_size * world_size * accum_freq
        self.steps_per_epoch = self.num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise CocaError(f"the training data has {self.num_samples} samples, fewer than one global batch of "
                            f"{global_batch} (--batch-size {cfg.batch_size} x {world_size} processes"
                            f"{f' x --accum-freq {accum_freq}' if accum_freq > 1 else ''})")
        self.state: dict = {}

    def epoch(self, epoch: int, start_step: int = 0, state: Optional[dict] = None) -> Iterator[Batch]:
        """The micro-batches of ``epoch`` from optimizer step ``start_step`` on.

        ``state`` is this rank's data position from a checkpoint (shards only); ``self.state``
        tracks the position after the batches handed out so far.
        """
        workers = self.cfg.workers
        if self.kind == "csv":
            sampler = GlobalBatches(len(self.samples), self.num_samples, self.cfg.batch_size, self.rank,
                                    self.world_size, self.accum_freq, self.cfg.seed, epoch, start_step)
            loader = DataLoader(self.samples, batch_sampler=sampler, num_workers=workers,
                                collate_fn=_collate(self.tokenizer), pin_memory=self.pin_memory)
            self.state = {}
            yield from _from_workers(loader)
            return
        state = state if state and start_step else {"read": {}, "next": 0}
        stream = ShardStream(self.shards, self.transform, self.tokenizer, self.cfg, self.rank, self.world_size,
                             epoch, resume=state, restart=start_step if self.cfg.resampled else 0)
        loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory)
        n_workers = max(1, workers)
        self.state = {"read": dict(state.get("read", {})), "next": state.get("next", 0)}
        remaining = (self.steps_per_epoch - start_step) * self.accum_freq
        if remaining <= 0:
            return
        for i, batch in enumerate(_from_workers(loader)):
            local, raw = batch.origin
            self.state = {"read": {**self.state["read"], local: raw}, "next": (local + 1) % n_workers}
            yield batch
            if i + 1 >= remaining:
                break


def _from_workers(loader: DataLoader) -> Iterator[Batch]:
    """A CocaError raised in a loader worker arrives wrapped in a traceback; keep its one line."""
    try:
        yield from loader
    except CocaError as err:
        message = str(err)
        if message.startswith("Caught "):
            message = message.strip().splitlines()[-1].split("CocaError: ", 1)[-1]
        raise CocaError(message, err.exit_code) from None


def eval_batches(spec: str, cfg: DataConfig, transform: Callable, tokenizer, limit: Optional[int] = None,
                 batch_size: int = 64) -> Iterator[Batch]:
    """Validation batches in file order (no shuffling, no augmentation), at most ``limit`` samples."""
    if dataset_kind(spec, cfg.dataset_type) == "csv":
        paths, captions = read_table(spec, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
        samples = CsvSamples(paths, captions, transform, cfg.seed)
        images, texts, skipped = [], [], Counter()
        total = min(len(paths), limit or len(paths))
        for index in range(total):
            try:
                image, caption = samples.load(index, 0)
            except SkipSample as why:
                skipped[str(why)] += 1
                continue
            images.append(image)
            texts.append(caption)
            if len(images) == batch_size:
                yield Batch(torch.stack(images), tokenizer(texts), skipped)
                images, texts, skipped = [], [], Counter()
        if images:
            yield Batch(torch.stack(images), tokenizer(texts), skipped)
        return
    problems: Counter = Counter()
    images, texts, taken = [], [], 0
    for url in resolve_shards(spec):
        for sample in tar_samples(url, problems):
            if limit is not None and taken >= limit:
                break
            try:
                caption = caption_of(sample)
                images.append(transform(decode_image(image_of(sample))))
                texts.append(caption)
                taken += 1
            except SkipSample as why:
                problems[str(why)] += 1
                continue
            if len(images) == batch_size:
                yield Batch(torch.stack(images), tokenizer(texts), problems)
                images, texts, problems = [], [], Counter()
    if images:
        yield Batch(torch.stack(images), tokenizer(texts), problems)


def describe_skipped(skipped: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"

