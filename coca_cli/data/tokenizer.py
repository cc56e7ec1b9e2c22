"""CLIP's byte-level BPE tokenizer, written from scratch.

CoCa checkpoints were trained with OpenAI CLIP's tokenizer (as shipped by
open_clip), so the ids we produce must match it bit for bit: any drift means
the text tower sees tokens it was never trained on. This module reproduces
``open_clip.tokenizer.SimpleTokenizer`` with its default ``clean='lower'``
without depending on open_clip.

The pipeline for one string:

1. clean: ``ftfy.fix_text``, ``html.unescape`` twice, collapse whitespace,
   lower-case;
2. split into pieces with CLIP's regex (special tokens, English contractions,
   letter runs, single digits, runs of anything else);
3. map each piece's UTF-8 bytes to printable unicode characters (so that BPE
   never has to deal with whitespace or control bytes), mark the end of the
   piece with ``</w>`` and apply the BPE merges, lowest rank first;
4. look the resulting symbols up in the vocabulary.

The merges file ``bpe_simple_vocab_16e6.txt.gz`` comes from OpenAI's CLIP
(MIT license, see ``LICENSE-bpe_simple_vocab.txt``).
"""

from __future__ import annotations

import functools
import gzip
import html
import operator
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import regex
import torch

DEFAULT_BPE_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77  # CLIP's; CoCa's text tower uses 76 + one CLS slot

START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"

# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a header),
# which together with 2 * 256 byte symbols and 2 special tokens gives 49408 ids.
NUM_MERGES = 49152 - 256 - 2

# Special tokens first so that they win over the generic alternatives.
# IGNORECASE is kept from CLIP: the text is lower-cased before matching anyway,
# but regex's case folding also lets e.g. "'ſ" (long s) match the "'s" branch,
# and we want identical splits even for such oddities.
_PIECE_PATTERN = regex.compile(
    "|".join(regex.escape(t) for t in (START_OF_TEXT, END_OF_TEXT))
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

# Bound on the per-tokenizer word cache; real captions use far fewer distinct
# words, the cap only protects long-running jobs fed with random junk.
_MAX_CACHED_WORDS = 1 << 18


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, reversibly.

    BPE works on strings, and the merges file is written in terms of these
    characters. Bytes that already print as themselves (``!``..``~``,
    ``¡``..``¬``, ``®``..``ÿ``) keep their code point; the remaining 68
    (whitespace, controls, ...) are moved, in byte order, to U+0100 onwards.
    The dict lists the printable bytes first, then the moved ones; the
    vocabulary takes its first 256 ids in that order (so id 0 is ``!``).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    moved = (b for b in range(256) if b not in table)
    for offset, b in enumerate(moved):
        table[b] = chr(256 + offset)
    return table  # insertion order matters: it is the order of the first 256 ids


def clean_text(text: str) -> str:
    """CLIP's 'lower' cleaning: fix broken unicode, unescape HTML, squash whitespace, lower-case.

    Unescaping twice handles doubly escaped web captions such as ``&amp;amp;``.
    ``str.split()`` (not the regex ``\\s``) defines whitespace here, as in CLIP.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _load_merges(bpe_path: str | Path) -> list[tuple[str, str]]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


class Tokenizer:
    """OpenAI CLIP's BPE tokenizer; ids identical to open_clip's ``SimpleTokenizer``.

    ``tokenizer(texts)`` gives the padded ``[N, context_length]`` id tensor the
    model consumes; ``encode`` / ``decode`` work on single strings.
    """

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
        merges = _load_merges(bpe_path or DEFAULT_BPE_PATH)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}

        # Vocabulary order defines the ids: 256 bare bytes, the same 256 bytes
        # ending a word, one entry per merge, then the two special tokens.
        byte_symbols = list(self.byte_encoder.values())
        vocab = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
        vocab += ["".join(pair) for pair in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder: dict[str, int] = {symbol: i for i, symbol in enumerate(vocab)}
        self.decoder: list[str] = vocab
        self.merge_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}

        self.sot_token_id = self.encoder[START_OF_TEXT]  # 49406
        self.eot_token_id = self.encoder[END_OF_TEXT]  # 49407
        self.pad_token_id = 0  # padding reuses id 0 ("!"); it only ever follows eot
        self.vocab_size = len(vocab)  # 49408
        self.context_length = context_length
        self._special_ids = {START_OF_TEXT: self.sot_token_id, END_OF_TEXT: self.eot_token_id}
        self._word_cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ encoding

    def bpe(self, word: str) -> list[str]:
        """Split one byte-encoded piece into vocabulary symbols.

        Start from single characters (the last one tagged ``</w>``) and keep
        merging the adjacent pair with the lowest merge rank, all of its
        non-overlapping occurrences left to right, until no known pair is left.
        """
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self.merge_ranks
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:])
            best = min(pairs, key=lambda pair: ranks.get(pair, NUM_MERGES))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """Ids of one regex piece, memoised: captions repeat the same words a lot."""
        ids = self._word_cache.get(piece)
        if ids is None:
            if piece in self._special_ids:
                ids = (self._special_ids[piece],)
            else:
                word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids = tuple(self.encoder[s] for s in self.bpe(word))
            if len(self._word_cache) >= _MAX_CACHED_WORDS:
                self._word_cache.clear()
            self._word_cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after cleaning, without start/end tokens or padding.

        A literal ``<start_of_text>`` / ``<end_of_text>`` inside the text becomes
        the special id, as in CLIP.
        """
        ids: list[int] = []
        for piece in _PIECE_PATTERN.findall(clean_text(text)):
            ids.extend(self._encode_piece(piece))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenize into a ``[N, context_length]`` LongTensor: sot, ids, eot, zero padding.

        Texts too long to fit are cut to ``context_length`` tokens and the last
        kept token is replaced by eot, so every row still ends its text.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else context_length
        if length < 1:
            raise ValueError(f"context_length must be >= 1, got {length}")

        rows = []
        for text in texts:
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            rows.append(ids + [self.pad_token_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)

    # ------------------------------------------------------------------ decoding

    def _as_id_list(self, ids: Iterable[int] | torch.Tensor) -> list[int]:
        """Accept lists, tuples, numpy arrays and 1-D tensors; validate every id."""
        if hasattr(ids, "ndim") and ids.ndim != 1:  # tensors and numpy arrays
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = operator.index(i)  # rejects floats; accepts numpy integers
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            out.append(i)
        return out

    def _ids_to_text(self, ids: list[int]) -> str:
        symbols = "".join(self.decoder[i] for i in ids)
        data = bytes(self.byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def decode_raw(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Ids to text with no cleanup: special tokens and padding show up literally.

        Same as open_clip's ``SimpleTokenizer.decode``: each ``</w>`` becomes a
        space (so the text usually ends in one) and bytes that are not valid
        UTF-8, e.g. a character cut in half, become U+FFFD.
        """
        return self._ids_to_text(self._as_id_list(ids))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Ids to readable text, e.g. one row of ``tokenizer(...)`` or a generated caption.

        Everything from the first eot on (including padding) is dropped, sot
        tokens are removed and the result is stripped. A sequence with no eot
        (a caption that hit the length limit) is kept whole, minus trailing
        padding zeros.
        """
        ids = self._as_id_list(ids)
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        else:
            while ids and ids[-1] == self.pad_token_id:
                ids.pop()
        ids = [i for i in ids if i != self.sot_token_id]
        return self._ids_to_text(ids).strip()


SimpleTokenizer = Tokenizer  # open_clip's name, for drop-in use


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The shared tokenizer, built on first use (loading the merges takes ~0.1 s)."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.LongTensor:
    """Tokenize with the shared default tokenizer; see ``Tokenizer.__call__``."""
    return default_tokenizer()(texts, context_length=context_length)


def decode(ids: Iterable[int] | torch.Tensor) -> str:
    """Decode with the shared default tokenizer; see ``Tokenizer.decode``."""
    return default_tokenizer().decode(ids)
