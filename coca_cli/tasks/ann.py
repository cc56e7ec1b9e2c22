"""Approximate search with faiss, for collections too large to scan at every query.

A faiss index is built once from the embeddings of an image index (``retrieve --index``) and kept
beside it as ``<index>.<type>.faiss``: a line naming the format, a JSON line (the type, its build
parameters and the SHA-256 of the paths and embeddings it was built from), faiss's own
serialisation, then the SHA-256 of that serialisation. It is used only while the collection and
model give the same embeddings (the digest) and the checksum holds; otherwise it is rebuilt, a
damaged one with a warning. faiss is optional (``pip install 'coca-cli[faiss]'``) and imported
only here, when an approximate index is asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import CocaError
from ..files import atomic_write

INDEX_TYPES = ("flat", "ivf", "hnsw")
HNSW_M = 32  # neighbours per node
HNSW_EF_CONSTRUCTION = 40  # faiss's default: build time grows with it, recall barely beyond it
HNSW_EF_SEARCH = 128  # faiss's default of 16 misses too many of the true top 10
IVF_NPROBE = 32  # lists searched per query (of about 4 * sqrt(n))
IVF_MIN_PER_LIST = 39  # images per list faiss's k-means asks for; fewer images make fewer lists
IVF_TRAINING_PER_LIST = 64  # k-means on a seeded sample of at most this many images a list (faiss: 30-256)
_MAGIC = b"coca-faiss-index/1\n"
_TRAILER = 65  # the payload's SHA-256 in hex and a newline
_BLOCK = 1 << 24


class FaissIndexDamaged(Exception):
    """A faiss index file that cannot be trusted; the reason is the message."""


def require_faiss(index_type: str):
    """The faiss module, or one line saying how to install it (checked before a model loads)."""
    try:
        import faiss
    except ImportError:
        raise CocaError(f"--index-type {index_type} needs faiss: pip install 'coca-cli[faiss]'") from None
    return faiss


def faiss_index_path(index: Path, index_type: str) -> Path:
    return Path(f"{index}.{index_type}.faiss")


def collection_digest(paths: Sequence[str], features: torch.Tensor) -> str:
    """What the faiss index answers for: each row's path and embedding, in order."""
    digest = hashlib.sha256("\0".join(paths).encode())
    digest.update(memoryview(features.float().contiguous().numpy()).cast("B"))
    return digest.hexdigest()


@dataclass
class ApproximateIndex:
    """A faiss index of a collection's embeddings; called with ([queries, dim] features, k), it
    gives [queries, k] candidate indices, -1 where it found fewer than k."""

    index: object
    index_type: str
    nprobe: int = IVF_NPROBE

    def __call__(self, query_features: torch.Tensor, k: int) -> torch.Tensor:
        faiss = require_faiss(self.index_type)
        params = {"ivf": lambda: faiss.SearchParametersIVF(nprobe=self.nprobe),
                  "hnsw": lambda: faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k))}.get(self.index_type)
        queries = np.ascontiguousarray(query_features.float().numpy())
        _, found = self.index.search(queries, min(k, self.index.ntotal), params=params() if params else None)
        return torch.from_numpy(found).long()


def build_index(index_type: str, features: torch.Tensor, ef_construction: int = HNSW_EF_CONSTRUCTION):
    """A faiss index (inner product: the embeddings are normalised, so it is cosine similarity).

    ivf: about 4 * sqrt(n) lists, but at least ``IVF_MIN_PER_LIST`` images each, down to a single
    list (which is exact) for a small collection; no collection is too small. hnsw: M = 32.
    """
    faiss = require_faiss(index_type)
    vectors = np.ascontiguousarray(features.float().numpy())
    count, dim = vectors.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    else:
        lists = max(1, min(round(4 * math.sqrt(count)), count // IVF_MIN_PER_LIST))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # a single list of fewer than 39 images needs no warning
        sample = min(count, lists * IVF_TRAINING_PER_LIST)
        index.train(vectors[np.sort(np.random.default_rng(0).choice(count, sample, replace=False))])
    index.add(vectors)
    return index


def load_or_build(index_type: str, paths: Sequence[str], features: torch.Tensor, path: Optional[Path],
                  warn: Callable[[str], None], nprobe: int = IVF_NPROBE) -> tuple[ApproximateIndex, str]:
    """The collection's faiss index: the one at ``path`` while it was built from these very paths
    and embeddings, else a new one, saved there (atomically; ``path`` None: not kept). Returns the
    index and a line saying which; a damaged file, or one that could not be written (the index is
    a cache: the search goes on), is reported through ``warn``."""
    digest = collection_digest(paths, features)
    if path is not None and path.is_file():
        try:
            index = _read(path, index_type, digest)
        except (OSError, FaissIndexDamaged) as err:
            warn(f"warning: rebuilding the faiss index {path}: {err}")
            index = None
        if index is not None:
            return ApproximateIndex(index, index_type, nprobe), f"reused the {index_type} index {path}"
    index = build_index(index_type, features)
    kept = "not kept: pass --index FILE to keep it"
    if path is not None:
        try:
            _write(path, index, {"type": index_type, "embeddings": digest, "count": len(paths)})
            kept = f"saved as {path}"
        except CocaError as err:
            warn(f"warning: the {index_type} index is not kept: {err}")
            kept = "not kept"
    return ApproximateIndex(index, index_type, nprobe), f"built the {index_type} index of {len(paths)} images ({kept})"


def _write(path: Path, index, header: dict) -> None:
    faiss = require_faiss(header["type"])

    def write(tmp):
        payload = hashlib.sha256()

        def chunk(data):
            payload.update(data)
            file.write(data)

        with open(tmp, "wb") as file:
            file.write(_MAGIC + json.dumps(header).encode() + b"\n")
            faiss.write_index(index, faiss.PyCallbackIOWriter(chunk))
            file.write(payload.hexdigest().encode() + b"\n")

    atomic_write(path, write)


def _read(path: Path, index_type: str, digest: str):
    """The index in ``path`` if it was built from ``digest``'s embeddings, else None; FaissIndexDamaged
    when any byte is wrong (the payload's checksum is verified before faiss reads it)."""
    faiss = require_faiss(index_type)
    with open(path, "rb") as file:
        if file.readline() != _MAGIC:
            raise FaissIndexDamaged("not a coca faiss index")
        try:
            header = json.loads(file.readline())
            if header["type"] != index_type or header["embeddings"] != digest:
                return None
        except (ValueError, KeyError, TypeError) as err:
            raise FaissIndexDamaged(f"malformed header ({err})") from None
        start, end = file.tell(), os.fstat(file.fileno()).st_size - _TRAILER
        if end <= start:
            raise FaissIndexDamaged("truncated")
        payload = hashlib.sha256()
        for block in _blocks(file, end - start):
            payload.update(block)
        if file.read() != payload.hexdigest().encode() + b"\n":
            raise FaissIndexDamaged("checksum mismatch: truncated or altered")
        file.seek(start)
        try:
            return faiss.read_index(faiss.PyCallbackIOReader(file.read))
        except RuntimeError as err:
            raise FaissIndexDamaged(f"faiss cannot read it ({str(err).splitlines()[0]})") from None


def _blocks(file, size: int):
    while size > 0:
        block = file.read(min(size, _BLOCK))
        if not block:
            raise FaissIndexDamaged("truncated")
        size -= len(block)
        yield block
