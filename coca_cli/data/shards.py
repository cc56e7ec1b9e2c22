"""webdataset tar shards: brace patterns and folders to shard lists, sizes.json, streams, samples.

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
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import CocaError
from ..files import atomic_write
from .samples import SkipSample, decode_image, failing_on

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "json")
SIZES_FILE = "sizes.json"  # samples per shard, beside the shards
JSON_CAPTION_FIELDS = ("caption", "text", "txt", "captions")  # "captions": a list, the first is used


# -- which shards --------------------------------------------------------------------------------

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
                found = sorted(str(p) for p in path.glob("*.tar") if p.is_file())  # not a FIFO named x.tar
                if not found:
                    raise CocaError(f"no .tar shards in {path}")
                shards += found
            elif path.is_file():
                shards.append(str(path))
            else:
                raise CocaError(f"no such file or folder of shards: {name}")
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
            sizes = folder / SIZES_FILE
            try:
                cache[folder] = json.loads(sizes.read_text()) if sizes.is_file() else None
            except (OSError, ValueError):
                cache[folder] = None
        if not cache[folder] or Path(shard).name not in cache[folder]:
            return None
        total += int(cache[folder][Path(shard).name])
    return total


# -- one sample's fields -------------------------------------------------------------------------

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


# -- reading -------------------------------------------------------------------------------------

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


class BrokenShard(CocaError):
    """A shard whose stream ended early or is damaged: what was read from it is not all of it."""

    def __init__(self, url: str, reason):
        super().__init__(f"shard {url} is cut short or damaged ({reason})", exit_code=1)


class _EndCheckedTarInfo(tarfile.TarInfo):
    """tarfile ends iteration quietly at a missing, partial or garbled header after the first
    member, so a shard cut at any point would read as a shorter, whole one. Only the
    end-of-archive marker (a zero block) ends a shard here; anything else is an error."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as err:
            raise tarfile.ReadError(f"{err} where the next member or the end-of-archive marker should be") from None


def tar_samples(url: str, problems: Optional[Counter] = None) -> Iterator[dict]:
    """Samples of one shard: {'__key__': key, '__url__': url, ext: bytes, ...}.

    A shard that is cut short or damaged raises BrokenShard where the damage is found (samples
    before it were handed out already); given ``problems`` (training, where it only means fewer
    samples), it is counted there instead and the shard just ends.
    """
    current: dict = {}
    for key, ext, _, data in tar_members(url, problems):
        if current and current["__key__"] != key:
            yield current
            current = {}
        current["__key__"], current["__url__"] = key, url
        current[ext.lower()] = data
    if current:
        yield current


def tar_members(url: str, problems: Optional[Counter] = None) -> Iterator[tuple[str, str, tarfile.TarInfo, bytes]]:
    """(sample key, extension, member header, contents) of each file of a shard that belongs to a
    sample, in archive order; damage is raised or counted as in :func:`tar_samples`."""
    try:
        with open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckedTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                yield f"{folder}/{stem}" if folder else stem, ext, member, tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as err:
        if problems is None:
            raise BrokenShard(url, err) from None
        problems[f"unreadable shard ({type(err).__name__})"] += 1


def transformed_samples(url: str, transform: Callable, skipped: Counter,
                        captions: bool = False) -> Iterator[tuple[str, Any, Optional[str]]]:
    """(key, transformed image, caption or None) for each usable sample of a shard, in order; the
    others are counted in ``skipped`` by reason. ``captions``: a sample needs one to be usable."""
    for sample in tar_samples(url):
        try:
            caption = caption_of(sample) if captions else None
            data = image_of(sample)
            with failing_on(f"sample {sample['__key__']} of {url}"):
                image = transform(decode_image(data))
        except SkipSample as reason:
            skipped[str(reason)] += 1
            continue
        yield sample["__key__"], image, caption


# -- writing -------------------------------------------------------------------------------------

def copy_samples(url: str, target: Path, keep: Callable[[str], bool]) -> int:
    """Write the samples of shard ``url`` whose key ``keep`` accepts to the shard ``target``, each
    member with its header and contents as they were (webdataset's layout, read by open_clip and
    img2dataset alike); returns how many samples were written. The file appears whole or not at all."""
    kept: set[str] = set()

    def write(tmp):
        with tarfile.open(tmp, "w") as out:
            for key, _, member, data in tar_members(url):
                if keep(key):
                    kept.add(key)
                    out.addfile(member, io.BytesIO(data))

    atomic_write(target, write)
    return len(kept)


def write_sizes(folder: Path, sizes: dict[str, int]) -> None:
    """``sizes.json``: samples per shard name, as open_clip reads it (see :func:`shard_sizes`)."""
    text = json.dumps(sizes, indent=2) + "\n"
    atomic_write(Path(folder) / SIZES_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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

