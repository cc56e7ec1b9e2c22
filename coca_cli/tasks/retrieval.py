"""The on-disk image index, search and retrieval recall, over :mod:`.embeddings`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..files import atomic_write
from ..errors import CocaError
from .embeddings import ImageFeatures

# -- the image index --------------------------------------------------------------------------

INDEX_FILE = ".coca-index.pt"
# The index file: this line, the SHA-256 (hex) of everything after its own line, a JSON header line
# (model, paths, sizes, mtimes, shape) and the features as raw little-endian float32, row by row.
_INDEX_MAGIC = b"coca-image-index/2\n"
_EARLIER_INDEX = b"coca-image-index/1"  # near the start of the torch.save'd indexes of earlier versions


class IndexDamaged(Exception):
    """An index file that cannot be trusted; the reason is the message."""


def model_fingerprint(model, sample: int = 1024, tower: str = "visual") -> str:
    """A short hash that changes whenever the image embeddings would (``tower="text"``: the text
    embeddings): other weights, size or precision.

    Only that tower counts (text weights do not change image embeddings). Hashing all of
    a ViT-L's weights on every query would cost seconds; names, shapes, dtypes and an evenly
    spaced sample of each tensor's values tell models apart just as well, in milliseconds.
    """
    digest = hashlib.sha256()
    module = getattr(model, tower)
    # the kinds of layers too: a QuickGELU or a norm computed in fp32 changes embeddings, not weights
    digest.update(" ".join(sorted({type(layer).__name__ for layer in module.modules()})).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().flatten()
        picked = flat[:: max(1, flat.numel() // sample)].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:16]


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def _stamp(path: Path) -> Optional[tuple[int, int]]:
    """(size, mtime_ns): what tells a file changed without reading it."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def check_index_file(path: Path) -> None:
    """Refuse (exit 2) an ``--index`` path holding something other than an index, so that no weights
    file or photo is ever replaced by one. Empty files and damaged or earlier indexes may be replaced."""
    path = Path(path)
    if path.is_dir():
        raise CocaError(f"--index {path} is a folder: give the index file's name")
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
    except FileNotFoundError:
        return
    except OSError as err:
        raise CocaError(f"cannot read --index {path}: {err.strerror or err}") from None
    if not (_INDEX_MAGIC.startswith(head[:len(_INDEX_MAGIC)]) or _EARLIER_INDEX in head):
        raise CocaError(f"--index {path} exists and is not a coca index; refusing to replace it "
                        "(choose another path, or remove the file)")


class ImageIndex:
    """Image embeddings kept in one file, so a collection is embedded once, then only what changed.

    Entries are keyed by absolute path and stamped with size and modification time; the file
    records the model fingerprint, and an index written by another model is ignored whole. A
    damaged file (checksum, size, shape or values wrong) is never used: ``damaged`` says why, and
    the index is rebuilt. Use: ``todo = index.stale(paths)``, embed ``todo`` and ``add`` the
    batches, ``lookup(paths)``, ``save()``. ``embedded``, ``reused`` and ``removed`` count what the run did.
    """

    def __init__(self, path: Optional[Path], fingerprint: str):
        self.path = Path(path) if path is not None else None
        self.fingerprint = fingerprint
        self.damaged: Optional[str] = None
        self.entries: dict[str, tuple[tuple[int, int], torch.Tensor]] = self._read()
        self.embedded = self.reused = self.removed = 0
        self._stamps: dict[str, Optional[tuple[int, int]]] = {}
        self._changed = self.damaged is not None  # a damaged file is replaced even when nothing is embedded

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            with open(self.path, "rb") as file:
                data = bytearray(file.read())  # writable: the features are a view of it, not a copy
            return _parse_index(data, self.fingerprint)
        except OSError as err:
            self.damaged = f"unreadable ({err.strerror or err})"
        except IndexDamaged as err:
            self.damaged = str(err)
        return {}

    def stale(self, paths: Sequence[Path]) -> list[Path]:
        """The paths to embed: new, or changed since they were embedded (their old entry is dropped).

        The stamps are taken now, before embedding, so a file changing meanwhile is caught next time.
        """
        todo = []
        for path in paths:
            key, stamp = _key(path), _stamp(path)
            self._stamps[key] = stamp
            entry = self.entries.get(key)
            if entry is None or stamp is None or entry[0] != stamp:
                todo.append(path)
                self._changed |= self.entries.pop(key, None) is not None
        self.reused = len(paths) - len(todo)
        return todo

    def add(self, batch: ImageFeatures) -> None:
        if batch.features is None:
            return
        for path, features in zip(batch.paths, batch.features):
            stamp = self._stamps.get(_key(path))
            if stamp is not None:
                self.entries[_key(path)] = (stamp, features)
        self.embedded += len(batch.paths)
        self._changed = True

    def lookup(self, paths: Sequence[Path]) -> ImageFeatures:
        """Embeddings of ``paths`` in order (those that have one); entries of files no longer in
        the collection are dropped, so the index mirrors the collection as it is now."""
        wanted = {_key(p) for p in paths}
        gone = [key for key in self.entries if key not in wanted]
        for key in gone:
            del self.entries[key]
        self.removed = len(gone)
        self._changed |= bool(gone)
        found = [p for p in paths if _key(p) in self.entries]
        features = torch.stack([self.entries[_key(p)][1] for p in found]) if found else None
        return ImageFeatures(found, features)

    def save(self) -> None:
        """Write the index atomically (temporary file, then rename); a no-op when nothing changed.
        A failed write is a CocaError naming the file and the OS reason; the previous file stays."""
        if self.path is None or not self._changed:
            return
        keys = list(self.entries)
        features = (torch.stack([self.entries[k][1] for k in keys]) if keys else torch.empty(0, 0)).float()
        header = json.dumps({"model": self.fingerprint, "paths": keys,
                             "sizes": [self.entries[k][0][0] for k in keys],
                             "mtimes": [self.entries[k][0][1] for k in keys],
                             "shape": list(features.shape)}).encode() + b"\n"
        values = memoryview(features.contiguous().numpy()).cast("B")  # raw float32, not copied
        digest = hashlib.sha256(header)
        digest.update(values)

        def write(tmp):
            with open(tmp, "wb") as file:
                file.write(_INDEX_MAGIC + digest.hexdigest().encode() + b"\n" + header)
                file.write(values)

        atomic_write(self.path, write)
        self._changed = False


def _parse_index(data: bytearray, fingerprint: str) -> dict:
    """The entries of an index file's bytes; {} when another model wrote it; IndexDamaged when any
    part is wrong (a flipped bit anywhere fails the checksum; the rest guards against a wrong writer)."""
    if not data.startswith(_INDEX_MAGIC):
        raise IndexDamaged("written by an earlier version" if _EARLIER_INDEX in data[:4096] else "not an index")
    digest_end = data.find(b"\n", len(_INDEX_MAGIC))
    header_end = data.find(b"\n", digest_end + 1)
    if digest_end < 0 or header_end < 0:
        raise IndexDamaged("truncated")
    body = memoryview(data)[digest_end + 1:]
    if hashlib.sha256(body).hexdigest().encode() != bytes(data[len(_INDEX_MAGIC):digest_end]):
        raise IndexDamaged("checksum mismatch: truncated or altered")
    try:
        header = json.loads(data[digest_end + 1:header_end])
        if header["model"] != fingerprint:
            return {}
        paths, sizes, mtimes, (rows, dim) = header["paths"], header["sizes"], header["mtimes"], header["shape"]
        if not len(paths) == len(sizes) == len(mtimes) == rows:
            raise IndexDamaged(f"{len(paths)} paths for {rows} rows of features")
        values = memoryview(data)[header_end + 1:]
        if len(values) != rows * dim * 4:
            raise IndexDamaged(f"{len(values)} bytes of features for shape ({rows}, {dim})")
        features = torch.frombuffer(values, dtype=torch.float32).view(rows, dim) if rows else torch.empty(0, 0)
        entries = {str(key): ((int(size), int(mtime)), row)
                   for key, size, mtime, row in zip(paths, sizes, mtimes, features)}
    except (ValueError, KeyError, TypeError) as err:
        raise IndexDamaged(f"malformed header ({err})") from None
    if not bool(torch.isfinite(features).all()):
        raise IndexDamaged("it holds NaN or infinite values")
    return entries


# -- search -----------------------------------------------------------------------------------


@dataclass
class Hit:
    rank: int  # 1 = best
    score: float  # cosine similarity
    item: str  # an image path (text→image) or a text (image→text)


@dataclass
class Ranking:
    query: str  # the query text, or the query image's path
    hits: list[Hit]
    query_is_image: bool = False

    @property
    def columns(self) -> tuple[str, str, str, str]:
        query_key, hit_key = ("image", "text") if self.query_is_image else ("query", "image")
        return query_key, "rank", hit_key, "score"

    def to_json(self) -> dict:
        query_key, _, hit_key, _ = self.columns
        return {query_key: self.query, "hits": [{"rank": h.rank, hit_key: h.item, "score": h.score} for h in self.hits]}

    def rows(self) -> list[tuple]:
        """One row per hit, in ``columns`` order."""
        return [(self.query, h.rank, h.item, h.score) for h in self.hits]


SEARCH_CHUNK = 65536  # candidates scored at once: peak memory is queries x (chunk + k) scores
_POOL = 16  # candidates per query and chunk rescored beyond k, so that near ties rarely need a second pass


def search(queries: Sequence[str], query_features: torch.Tensor, candidates: Sequence[str],
           candidate_features: torch.Tensor, k: int, query_is_image: bool = False,
           device: Optional[torch.device] = None, approximate: Optional[Callable] = None) -> list[Ranking]:
    """For each query, the ``k`` candidates with the highest cosine similarity, best first: all of
    them scanned (:func:`top_k`), or those an approximate index (:mod:`.ann`) proposes, rescored
    exactly and ranked as :func:`top_k` ranks them."""
    if approximate is None:
        scores, indices = top_k(query_features, candidate_features, k, device=device)
    else:
        proposed = approximate(query_features, k)
        scores = _exact_scores(query_features, candidate_features, proposed.clamp(min=0))
        scores, indices = _keep_best(scores.masked_fill(proposed < 0, float("-inf")), proposed, k)
    return [Ranking(query, [Hit(rank, score, candidates[i])
                            for rank, (i, score) in enumerate(zip(idx.tolist(), val.tolist()), start=1) if i >= 0],
                    query_is_image)
            for query, val, idx in zip(queries, scores, indices)]


@torch.no_grad()
def top_k(query_features: torch.Tensor, candidate_features: torch.Tensor, k: int, chunk: int = SEARCH_CHUNK,
          device: Optional[torch.device] = None, fast_dtype: Optional[torch.dtype] = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, candidates)`` best candidates of each query: ([queries, k] scores, their indices).

    Exact and independent of ``chunk``: a score is the dot product computed in float64 and rounded
    to float32, and equal scores rank the earlier candidate first (torch.topk orders ties as it
    happens to). Candidates are scored ``chunk`` rows at a time by a fast matmul (``fast_dtype``:
    fp16 on CUDA, fp32 elsewhere) that only picks each query's best few, which are then rescored
    exactly; while any candidate left out scores, by the fast matmul's error bound, within reach of
    the k-th, more are rescored. So memory stays at queries x (chunk + k) and nothing is sorted
    whole, however large the collection.
    """
    k, device = min(k, len(candidate_features)), torch.device(device or "cpu")
    fast_dtype = fast_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    queries = query_features.to(device, fast_dtype)
    query_norm = float(query_features.norm(dim=1).max()) if len(query_features) else 0.0
    best = (torch.empty(len(query_features), 0), torch.empty(len(query_features), 0, dtype=torch.long))
    for start in range(0, len(candidate_features), chunk):
        block = candidate_features[start:start + chunk]
        scores = _fast_scores(queries, block.to(device, fast_dtype))
        margin = _error_bound(fast_dtype, block.shape[1]) * query_norm
        previous, pool = best, min(k + _POOL, len(block))
        while True:
            fast = scores.topk(pool, dim=1)
            picked = fast.indices.cpu() + start
            best = _keep_best(torch.cat([previous[0], _exact_scores(query_features, candidate_features, picked)], 1),
                              torch.cat([previous[1], picked], 1), k)
            floor = (best[0][:, -1] - margin).to(device)  # a fast score below it cannot reach the k-th
            if pool == len(block) or not bool((fast.values[:, -1] >= floor).any()):
                break
            within_reach = int((scores >= floor[:, None]).sum(dim=1).max())
            if within_reach <= pool:
                break
            pool = within_reach
    return best


def _fast_scores(queries: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """float32 scores of the fast matmul (accumulated in float32 on CUDA, whatever the inputs)."""
    if queries.is_cuda and queries.dtype != torch.float32:
        return torch.mm(queries, block.T, out_dtype=torch.float32)
    return (queries @ block.T).float()


def _error_bound(dtype: torch.dtype, dim: int) -> float:
    """How far a fast score can be from the exact float32 one, for a unit-length candidate (the
    embeddings here always are; measuring every candidate's length would cost as much as scoring
    it) and per unit of the query's length: float32 accumulation over ``dim`` products, plus, for
    16-bit inputs, their rounding and that of the output."""
    accumulation = 2 * (dim + 2) * 2.0 ** -24
    return accumulation if dtype == torch.float32 else accumulation + 4 * torch.finfo(dtype).eps


def _exact_scores(query_features: torch.Tensor, candidate_features: torch.Tensor, picked: torch.Tensor,
                  budget: int = 1 << 24) -> torch.Tensor:
    """[queries, n] float32 scores of each query with its ``picked`` [queries, n] candidates,
    computed in float64 (so the same whichever others are picked), ``budget`` values at a time."""
    rows = max(1, budget // max(1, picked.shape[1] * candidate_features.shape[1]))
    out = torch.empty(picked.shape)
    for start in range(0, len(picked), rows):
        chosen = candidate_features[picked[start:start + rows]].double()
        out[start:start + rows] = torch.bmm(chosen, query_features[start:start + rows].double()[:, :, None])[..., 0]
    return out


def _keep_best(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row, highest score first and equal scores by lower index."""
    by_index = indices.argsort(dim=1)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


# -- retrieval evaluation ---------------------------------------------------------------------


def retrieval_recall(scores: torch.Tensor, caption_image: Sequence[int],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways, as CLIP_benchmark's ``zeroshot_retrieval`` defines it, under its names.

    ``scores`` is [captions, images]; ``caption_image[t]`` is the image caption ``t`` describes.
    ``image_retrieval_recall@k`` (text→image): a caption scores when its image is among its k
    best images. ``text_retrieval_recall@k`` (image→text): an image scores when ANY of its
    captions is among its k best captions. k beyond the number of candidates means all of them.
    The one definition of recall here: ``coca eval retrieval`` and validation during training use it.
    """
    target = torch.as_tensor(list(caption_image))
    image_ids = torch.arange(scores.shape[1])
    metrics = {}
    for k in ks:
        best_images = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [captions, k]
        best_captions = scores.T.topk(min(k, scores.shape[0]), dim=1).indices  # [images, k]
        metrics[f"image_retrieval_recall@{k}"] = _share((best_images == target[:, None]).any(dim=1))
        metrics[f"text_retrieval_recall@{k}"] = _share((target[best_captions] == image_ids[:, None]).any(dim=1))
    return metrics


def _share(hits: torch.Tensor) -> float:
    return hits.double().mean().item()

