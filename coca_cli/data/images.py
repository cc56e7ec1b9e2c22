"""Loading images in batches, in worker processes, reporting the ones that fail."""

from __future__ import annotations

import multiprocessing
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..errors import CocaError
from .transforms import ImageLoadError, load_image


@dataclass
class Batch:
    paths: list[Path]
    images: Optional[torch.Tensor]  # [B, 3, H, W] for the paths that loaded
    failures: list[tuple[Path, str]]  # (path, reason) for the ones that did not


PREFETCH = 2  # batches handed to each worker ahead of the one being consumed


def _decode(path: Path, transform: Callable) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(image, None), or (None, reason) when this file cannot be used."""
    try:
        return transform(load_image(path)), None
    except ImageLoadError as err:
        return None, err.reason
    except (OSError, ValueError) as err:  # a decoder error surfacing during transform
        return None, f"cannot decode image ({err})"
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever else breaks on this file, it is this file's failure
        return None, f"failed: {type(err).__name__}: {err}"


def _load(paths: list[Path], transform: Callable, on_image: Callable[[int], None] = lambda i: None) -> Batch:
    decoded = []
    for i, path in enumerate(paths):
        on_image(i)
        decoded.append((path, *_decode(path, transform)))
    good = [(p, x) for p, x, _ in decoded if x is not None]
    return Batch(paths=[p for p, _ in good],
                 images=torch.stack([x for _, x in good]) if good else None,
                 failures=[(p, reason) for p, x, reason in decoded if x is None])


def _worker(paths: list[Path], transform: Callable, slot: int, reading, tasks, results) -> None:
    """Decodes the batches ``tasks`` names, in order, into ``results``; ``reading[slot]`` is the
    image it is on (index + 1), so that its death can be reported with the file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: no cleanup to do here
    torch.set_num_threads(1)  # one image at a time per worker, as torch's DataLoader does
    while True:
        try:
            start, stop = tasks.recv()
        except EOFError:  # the parent is gone
            return

        def on_image(i: int) -> None:
            reading[slot] = start + i + 1

        try:
            batch = _load(paths[start:stop], transform, on_image)
            # Pixels travel as plain bytes through the pipe: no shared-memory file descriptors to run out of.
            results.send((batch.paths, None if batch.images is None else batch.images.numpy(), batch.failures))
        except Exception as err:  # noqa: BLE001 - raised again in the parent, as without workers
            results.send(err)


class _Workers:
    """``count`` processes decoding batches in turn: batch b goes to worker b % count and is read
    back from that worker's own pipe, so results come in input order and a worker that dies (a
    decoder crash, the out-of-memory killer) shows up deterministically as the end of its pipe,
    when its batch is next, never as a signal landing at an arbitrary moment."""

    def __init__(self, paths: list[Path], transform: Callable, count: int):
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)  # fork: starts at once
        self.paths = paths
        self.reading = context.RawArray("q", count)
        self.workers = []
        for slot in range(count):
            tasks, task_sender = context.Pipe(duplex=False)
            result_reader, results = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(paths, transform, slot, self.reading, tasks, results),
                                      daemon=True, name=f"coca-images-{slot}")
            process.start()
            tasks.close()
            results.close()  # the worker now holds the only writing end: its death ends the pipe
            self.workers.append((process, task_sender, result_reader))

    def send(self, batch: int, span: tuple[int, int]) -> None:
        self.workers[batch % len(self.workers)][1].send(span)

    def receive(self, batch: int, span: tuple[int, int]) -> Batch:
        slot = batch % len(self.workers)
        process, _, results = self.workers[slot]
        try:
            reply = results.recv()
        except EOFError:
            process.join()
            code = process.exitcode
            why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            reading = self.reading[slot] or span[0] + 1
            raise CocaError(f"a worker decoding images died while reading {self.paths[reading - 1]} ({why}); "
                            "results so far are kept", exit_code=1) from None
        if isinstance(reply, BaseException):
            raise reply
        paths, images, failures = reply
        return Batch(paths, None if images is None else torch.from_numpy(images), failures)

    def close(self) -> None:
        for process, task_sender, result_reader in self.workers:
            process.kill()
            process.join()
            task_sender.close()
            result_reader.close()


def iter_batches(paths: list[Path], transform: Callable, batch_size: int, workers: int = 0) -> Iterator[Batch]:
    """Batches in input order; decoding runs in ``workers`` background processes, each with
    PREFETCH batches queued. A worker that dies stops the run with one line naming its file."""
    spans = [(start, min(start + batch_size, len(paths))) for start in range(0, len(paths), batch_size)]
    if workers <= 0 or not spans:
        for start, stop in spans:
            yield _load(paths[start:stop], transform)
        return
    workers = min(workers, len(spans))
    pool = _Workers(paths, transform, workers)
    try:
        ahead = PREFETCH * workers
        for batch, span in enumerate(spans[:ahead]):
            pool.send(batch, span)
        for batch, span in enumerate(spans):
            result = pool.receive(batch, span)
            if batch + ahead < len(spans):
                pool.send(batch + ahead, spans[batch + ahead])
            yield result
    finally:
        pool.close()  # also on Ctrl-C or an error in the consumer: no worker outlives the run
