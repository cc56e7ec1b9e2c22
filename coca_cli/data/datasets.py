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

Reading the sources themselves is in :mod:`.tables` and :mod:`.shards`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import CocaError
from .samples import SkipSample, decode_image, failing_on, sample_seed, seeded
from .shards import caption_of, image_of, resolve_shards, shard_sizes, shuffled, tar_samples
from .tables import CsvSamples, read_table
from .transforms import decodes_lazily, fast_training_transform, stack_images


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


# -- this rank's micro-batches -------------------------------------------------------------------

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


def _collate(tokenizer, transform):
    def collate(items):
        skipped: Counter = Counter()
        for *_, s in items:
            skipped.update(s)
        return Batch(stack_images([i for i, _, _ in items], transform), tokenizer([c for _, c, _ in items]), skipped)
    return collate


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
                    image = seeded(self.transform, decode_image(data, lazy=decodes_lazily(self.transform)),
                                   sample_seed(self.cfg.seed, self.epoch, self.restart, role, raw))
            except SkipSample as why:
                problems[str(why)] += 1
                continue
            images.append(image)
            captions.append(caption)
            if len(images) == self.cfg.batch_size:
                yield Batch(stack_images(images, self.transform), self.tokenizer(captions), Counter(problems),
                            origin=(local, raw))
                images, captions = [], []
                problems.clear()


# -- what training iterates ----------------------------------------------------------------------

class TrainData:
    """Micro-batches for one rank, epoch by epoch, with a position that can be checkpointed."""

    def __init__(self, cfg: DataConfig, transform: Callable, tokenizer, rank: int = 0, world_size: int = 1,
                 accum_freq: int = 1, pin_memory: bool = False):
        transform = fast_training_transform(transform)
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
                                collate_fn=_collate(self.tokenizer, self.transform), pin_memory=self.pin_memory)
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
