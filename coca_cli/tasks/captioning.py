"""Captioning many images: batched generation and result files that survive interruption."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..data.images import iter_batches
from ..errors import CocaError, reading
from .output import FILE_FORMATS, RecordFile, RecordWriter, check_replaceable, file_format, unescape_field
from ..data.tokenizer import decode
from .embeddings import score_texts

# .txt is path<TAB>caption lines (fields escaped), like stdout; .tsv a real TSV with a header (see RecordWriter)
OUTPUT_FORMATS = {**FILE_FORMATS, ".json": "jsonl", ".txt": "txt"}


CANDIDATE_TOP_P = 0.9  # nucleus sampling for the extra --candidates when the captions come from beam search


@dataclass
class Caption:
    """An image's caption; with scoring, its image-text score; with candidates, also the caption
    the model gives by default and that caption's score (the chosen one never scores below it)."""

    caption: str
    score: Optional[float] = None
    default_caption: Optional[str] = None
    default_score: Optional[float] = None

    def fields(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None}


def caption_columns(score: bool = False, candidates: int = 1) -> tuple[str, ...]:
    """The fields of each result, after the image: those of :class:`Caption` the options fill in."""
    if candidates > 1:
        return "caption", "score", "default_caption", "default_score"
    return ("caption", "score") if score else ("caption",)


def caption_batch(model, images: torch.Tensor, names: Sequence, generator: Optional[torch.Generator] = None,
                  tokenizer: Optional[Callable] = None, candidates: int = 1, **generate_kwargs) -> list[Caption]:
    """Captions of a batch of transformed images (``names`` name them in errors).

    Given a ``tokenizer``, each caption is scored (:func:`.embeddings.score_texts`). ``candidates`` > 1
    (which needs the tokenizer): the default caption and ``candidates - 1`` sampled ones are scored
    and the best kept, the default on a tie. The samples follow the sampling options when the
    default caption is sampled itself, else nucleus sampling with top_p CANDIDATE_TOP_P.
    """
    param = next(model.parameters())
    images = images.to(device=param.device, dtype=param.dtype, non_blocking=True)
    texts = [[decode(ids)] for ids in model.generate(images, generator=generator, **generate_kwargs).tolist()]
    if tokenizer is None:
        return [Caption(default) for default, in texts]
    if candidates > 1:
        sampling = generate_kwargs
        if generate_kwargs.get("generation_type", "beam_search") == "beam_search":
            sampling = {**generate_kwargs, "generation_type": "top_p", "top_p": CANDIDATE_TOP_P}
        samples = model.generate(images.repeat_interleave(candidates - 1, dim=0), generator=generator, **sampling)
        for i, ids in enumerate(samples.tolist()):
            texts[i // (candidates - 1)].append(decode(ids))
    scores = score_texts(model, tokenizer, images, texts, names)
    if candidates == 1:
        return [Caption(default, score) for (default,), (score,) in zip(texts, scores.tolist())]
    best = scores.argmax(dim=1).tolist()  # the first of equal maxima: the default caption wins ties
    return [Caption(options[i], row[i], options[0], row[0]) for options, row, i in zip(texts, scores.tolist(), best)]


def caption_images(model, transform: Callable, paths: list[Path], batch_size: int = 8, workers: int = 0,
                   **caption_options) -> Iterator[tuple[Path, Optional[Caption], Optional[str]]]:
    """Yield ``(path, caption, None)`` per image, or ``(path, None, reason)`` when it cannot be read;
    ``caption_options`` are :func:`caption_batch`'s."""
    for batch in iter_batches(paths, transform, batch_size, workers):
        for path, reason in batch.failures:
            yield path, None, reason
        if batch.images is None:
            continue
        for path, caption in zip(batch.paths, caption_batch(model, batch.images, batch.paths, **caption_options)):
            yield path, caption, None


class CaptionWriter:
    """Writes one line per caption as soon as it exists, flushed, so nothing done is lost.

    The format follows the output file's suffix (.jsonl, .csv, .tsv, .txt); without a file,
    path<TAB>caption lines (or JSON Lines) go to stdout. An existing file that coca did not write
    is refused before anything starts; with ``resume`` an earlier run's file is read
    (:func:`read_earlier_run`) and added to, else it is replaced once the first caption is ready.
    """

    def __init__(self, output: Optional[Path] = None, as_json: bool = False, resume: bool = False,
                 columns: Sequence[str] = ("caption",)):
        fmt = file_format(output, OUTPUT_FORMATS) if output is not None else ("jsonl" if as_json else "txt")
        self.output, self.columns = output, ("image", *columns)
        self.earlier = EarlierRun(set(), 0, None)
        self._file: Optional[RecordFile] = None
        if output is not None:
            check_replaceable(output, fmt)
            if resume and output.is_file():
                self.earlier = read_earlier_run(output, fmt, self.columns)
            self._file = RecordFile(output, fmt, self.columns, keep=self.earlier.whole_bytes or None)
        self.done = self.earlier.done
        self._fmt = fmt
        self._records = self._file or RecordWriter(sys.stdout, fmt, self.columns)

    def write(self, image: str, caption: Caption) -> None:
        record = {"image": image, **caption.fields()}
        row = [record[name] for name in self.columns]
        if self._fmt == "txt":  # lines are for eyes: scores to 4 places, as `coca retrieve` shows them
            row = [f"{value:.4f}" if isinstance(value, float) else value for value in row]
        self._records.write(record, [row])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class EarlierRun:
    """What an earlier run's output file holds."""

    done: set[str]  # the images captioned in it
    whole_bytes: int  # its length up to the end of the last whole record
    cut_line: Optional[int]  # the number of a last line cut short by a killed run, dropped and redone


def parse_caption_line(text: str, fmt: str, where: str) -> tuple[str, str]:
    """(image, caption) from one line of a jsonl or txt captions file; ``where`` ("FILE, line N")
    starts the error a malformed line raises. Other fields (a score) are left out."""
    return _parse_caption_line(text, fmt, where)[:2]


def _parse_caption_line(text: str, fmt: str, where: str) -> tuple[str, str, tuple]:
    """(image, caption, the line's fields: names for jsonl, else how many)."""
    if fmt == "txt":
        fields = text.rstrip("\r\n").split("\t")
        if len(fields) < 2:
            raise CocaError(f"{where}: expected image<TAB>caption")
        return unescape_field(fields[0]), unescape_field(fields[1]), (len(fields),)
    try:
        row = json.loads(text)
    except ValueError as err:
        raise CocaError(f"{where}: not valid JSON ({err.args[0].split(':')[0]})") from None
    if not isinstance(row, dict) or "image" not in row or "caption" not in row:
        raise CocaError(f"{where}: expected a JSON object with fields image and caption")
    if not isinstance(row["image"], str) or not isinstance(row["caption"], str):
        raise CocaError(f"{where}: expected an image path and a caption (strings)")
    return row["image"], row["caption"], tuple(sorted(row))


def read_earlier_run(path: Path, fmt: str, columns: Sequence[str] = ("image", "caption")) -> EarlierRun:
    """The images an earlier (maybe interrupted) run captioned into ``path``, for ``--resume``.

    A last record without its line end was cut short by a killed run: it is left out (and
    dropped from the file before new lines are added), so its image is captioned again. Any
    other damage (a malformed line, bytes that are not UTF-8) is an error naming the line: a
    file that is not read exactly could make the run caption images twice. So is a record with
    other fields than ``columns`` (written with other options): its lines would not match the new ones.
    """
    with reading(path, "--resume file"):
        data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    try:
        lines = [line + "\n" for line in whole.decode("utf-8").split("\n")[:-1]]
    except UnicodeDecodeError as err:
        raise _damaged(path, whole[:err.start].count(b"\n") + 1, "not UTF-8 text") from None
    done: set[str] = set()
    kept = 0
    for image, kept in _records(path, fmt, columns, lines, cut=len(whole) < len(data)):
        if image is not None:
            done.add(image)
    return EarlierRun(done, kept, data[:kept].count(b"\n") + 1 if kept < len(data) else None)


def _records(path: Path, fmt: str, columns: Sequence[str], lines: list[str],
             cut: bool) -> Iterator[tuple[Optional[str], int]]:
    """(image, or None for a header or blank line; byte offset where the record ends) for each
    record of a captions file's whole ``lines``. ``cut``: the file ends in an unfinished line, so a
    CSV record still open at the end (a quoted file name holding a newline) is that unfinished one."""
    end = 0

    def feed():
        nonlocal end
        for line in lines:
            end += len(line.encode("utf-8"))
            yield line

    layout = (len(columns),) if fmt == "txt" else tuple(sorted(columns))
    if fmt not in ("csv", "tsv"):
        for number, line in enumerate(feed(), start=1):
            if not line.strip():
                yield None, end
                continue
            try:
                image, _, fields = _parse_caption_line(line, fmt, f"{path}, line {number}")
            except CocaError as err:
                raise CocaError(f"{err}{_RESUME_HINT}") from None
            if fields != layout:
                raise _other_options(path, number, columns)
            yield image, end
        return
    rows = csv.reader(feed(), delimiter="," if fmt == "csv" else "\t", strict=True)
    try:
        for row in rows:
            if rows.line_num == 1 and row != list(columns):
                raise _other_options(path, 1, columns)
            if rows.line_num > 1 and row and len(row) != len(columns):
                raise _damaged(path, rows.line_num, f"expected {', '.join(columns)}")
            yield (row[0] if rows.line_num > 1 and row else None), end
    except csv.Error as err:
        if not (cut and rows.line_num == len(lines)):
            raise _damaged(path, rows.line_num, f"not a well-formed row ({err})") from None


_RESUME_HINT = " (--resume needs each line whole: fix or remove it, or caption without --resume)"


def _damaged(path: Path, line: int, reason: str) -> CocaError:
    return CocaError(f"{path}, line {line}: {reason}{_RESUME_HINT}")


def _other_options(path: Path, line: int, columns: Sequence[str]) -> CocaError:
    return CocaError(f"{path}, line {line}: not the fields this run writes ({', '.join(columns)}): resume with the "
                     "--score/--candidates options that wrote it, or write to another --output")
