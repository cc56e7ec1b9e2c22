"""COCO caption metrics without Java: BLEU-1..4, ROUGE-L and CIDEr-D; METEOR and SPICE with it.

These reproduce the MS COCO caption evaluation code (``pycocoevalcap``, the reference every
captioning paper reports) on the same inputs, tokenised by :mod:`.ptb_tokenizer`:

* :func:`bleu`, :func:`rouge_l` and :func:`cider_d` compute the scores with the same
  arithmetic as ``pycocoevalcap`` (corpus BLEU with the closest reference length, ROUGE-L
  with beta 1.2, CIDEr-D with sigma 6, n-grams up to 4, document frequencies from the
  references, clipping, the Gaussian length penalty and the x10 scale).
* METEOR and SPICE exist only as Java programs; :func:`meteor` and :func:`spice` run the jars
  that ship with ``pycocoevalcap`` when that package and ``java`` are both installed, and
  :func:`java_metrics_status` says why they are unavailable otherwise.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Hashable, Mapping, Optional, Sequence

from .ptb_tokenizer import tokenize

__all__ = ["bleu", "rouge_l", "cider_d", "meteor", "spice", "java_metrics_status", "score_captions"]


# --------------------------------------------------------------------------------------------
# Metrics. Inputs are already tokenised: {key: [reference, ...]} and {key: hypothesis}, each a
# string of space-separated tokens (what `tokenize` returns). Scores are on pycocoevalcap's
# scale (0..1; CIDEr 0..10); papers print them x100.
# --------------------------------------------------------------------------------------------

def _ngrams(words: Sequence[str], n: int) -> dict[tuple, int]:
    counts: dict[tuple, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check(references: Mapping, hypotheses: Mapping) -> list:
    if set(references) != set(hypotheses):
        missing = set(references) ^ set(hypotheses)
        raise ValueError(f"references and hypotheses are for different images (e.g. {next(iter(missing))!r})")
    for key, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {key!r} needs a non-empty list of references")
    return list(references)


def bleu(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], n: int = 4
         ) -> tuple[list[float], dict[Hashable, list[float]]]:
    """Corpus BLEU-1..n as in pycocoevalcap (brevity penalty from the closest reference length),
    and the per-image scores pycocoevalcap reports alongside."""
    keys = _check(references, hypotheses)
    small, tiny = 1e-9, 1e-15
    total_guess, total_correct = [0] * n, [0] * n
    total_test = total_ref = 0
    per_image: dict[Hashable, list[float]] = {}
    for key in keys:
        ref_lens, max_counts = [], {}
        for ref in references[key]:
            words = ref.split()
            ref_lens.append(len(words))
            for gram, count in _ngrams(words, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        words = hypotheses[key].split()
        test_len = len(words)
        ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        total_test += test_len
        total_ref += ref_len
        scores, product = [], 1.0
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
            product *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
            scores.append(product ** (1.0 / (k + 1)))
        ratio = (test_len + tiny) / (ref_len + small)
        if ratio < 1:
            scores = [s * math.exp(1 - 1 / ratio) for s in scores]
        per_image[key] = scores
    corpus, product = [], 1.0
    for k in range(n):
        product *= float(total_correct[k] + tiny) / (total_guess[k] + small)
        corpus.append(product ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        corpus = [s * math.exp(1 - 1 / ratio) for s in corpus]
    return corpus, per_image


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], beta: float = 1.2
            ) -> tuple[float, dict[Hashable, float]]:
    """ROUGE-L F-measure (beta 1.2) against the best-matching reference, averaged over images."""
    keys = _check(references, hypotheses)
    per_image = {}
    for key in keys:
        cand = hypotheses[key].split(" ")
        prec, rec = [], []
        for ref in references[key]:
            words = ref.split(" ")
            lcs = _lcs(words, cand)
            prec.append(lcs / float(len(cand)))
            rec.append(lcs / float(len(words)))
        p, r = max(prec), max(rec)
        per_image[key] = ((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p) if p != 0 and r != 0 else 0.0
    return (sum(per_image.values()) / len(per_image) if per_image else float("nan")), per_image


def cider_d(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], n: int = 4,
            sigma: float = 6.0) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D as pycocoevalcap computes it ("CIDEr"): tf-idf n-gram cosine similarity with
    document frequencies from these references, clipped, with a Gaussian length penalty, x10."""
    keys = _check(references, hypotheses)
    ref_counts = [[_ngrams(r.split(), n) for r in references[key]] for key in keys]
    doc_freq: dict[tuple, float] = defaultdict(float)
    for counts in ref_counts:
        for gram in {g for c in counts for g in c}:
            doc_freq[gram] += 1
    log_images = math.log(float(len(keys)))

    def vector(counts):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            df = math.log(max(1.0, doc_freq.get(gram, 0.0)))
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_images - df)
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # sic: pycocoevalcap's "length" counts bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    penalty_scale = 2 * sigma ** 2
    per_image = {}
    for key, counts in zip(keys, ref_counts):
        vec, norm, length = vector(_ngrams(hypotheses[key].split(), n))
        score = [0.0] * n
        for ref in counts:
            vec_ref, norm_ref, length_ref = vector(ref)
            delta = float(length - length_ref)
            penalty = math.e ** (-(delta ** 2) / penalty_scale)
            for k in range(n):
                val = 0.0
                for gram, weight in vec[k].items():
                    ref_weight = vec_ref[k].get(gram, 0.0)
                    val += min(weight, ref_weight) * ref_weight
                if norm[k] != 0 and norm_ref[k] != 0:
                    val /= norm[k] * norm_ref[k]
                score[k] += val * penalty
        per_image[key] = sum(score) / n / len(counts) * 10.0
    return (sum(per_image.values()) / len(per_image) if per_image else float("nan")), per_image


# --------------------------------------------------------------------------------------------
# METEOR and SPICE: only as Java programs, run from pycocoevalcap's jars when both are present.
# --------------------------------------------------------------------------------------------

def _pycocoevalcap_dir() -> Optional[Path]:
    import importlib.util

    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def java_metrics_status() -> dict[str, Optional[str]]:
    """{"METEOR": None | why unavailable, "SPICE": None | why unavailable}."""
    root = _pycocoevalcap_dir()
    java = shutil.which("java")
    status: dict[str, Optional[str]] = {}
    for name in ("METEOR", "SPICE"):
        if root is None:
            status[name] = "needs pycocoevalcap (pip install pycocoevalcap) and Java"
        elif java is None:
            status[name] = "needs Java (java not found on PATH)"
        else:
            status[name] = None
    if status["METEOR"] is None and not (root / "meteor" / "meteor-1.5.jar").is_file():
        status["METEOR"] = f"meteor-1.5.jar missing from {root / 'meteor'}"
    if status["SPICE"] is None:
        lib = root / "spice" / "lib"
        if not (root / "spice" / "spice-1.0.jar").is_file():
            status["SPICE"] = f"spice-1.0.jar missing from {root / 'spice'}"
        elif not all((lib / f"stanford-corenlp-3.6.0{s}.jar").is_file() for s in ("", "-models")):
            status["SPICE"] = (f"needs the Stanford CoreNLP 3.6.0 jars in {lib} (pycocoevalcap downloads them on "
                               "first use: python -c 'from pycocoevalcap.spice.spice import Spice; Spice()')")
    return status


def meteor(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]
           ) -> tuple[float, dict[Hashable, float]]:
    """METEOR 1.5 (``-l en -norm``) through pycocoevalcap's jar, the way pycocoevalcap runs it."""
    keys = _check(references, hypotheses)
    reason = java_metrics_status()["METEOR"]
    if reason:
        raise RuntimeError(f"METEOR unavailable: {reason}")
    folder = _pycocoevalcap_dir() / "meteor"
    proc = subprocess.Popen(["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
                            cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        stats = []
        for key in keys:
            hyp = hypotheses[key].replace("|||", "").replace("  ", " ")
            line = " ||| ".join(("SCORE", " ||| ".join(references[key]), hyp))
            proc.stdin.write((line + "\n").encode())
            proc.stdin.flush()
            stats.append(proc.stdout.readline().decode().strip())
        proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        proc.stdin.flush()
        per_image = {key: float(proc.stdout.readline().strip()) for key in keys}
        score = float(proc.stdout.readline().strip())
    except (ValueError, BrokenPipeError) as err:
        raise RuntimeError(f"METEOR failed: {err}") from None
    finally:
        proc.kill()
        proc.wait()
    return score, per_image


def spice(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]
          ) -> tuple[float, dict[Hashable, float]]:
    """SPICE 1.0 F-score through pycocoevalcap's jar (needs the CoreNLP 3.6.0 models)."""
    import json

    keys = _check(references, hypotheses)
    reason = java_metrics_status()["SPICE"]
    if reason:
        raise RuntimeError(f"SPICE unavailable: {reason}")
    folder = _pycocoevalcap_dir() / "spice"
    with tempfile.TemporaryDirectory(prefix="coca-spice-") as tmp:
        ids = {str(i): key for i, key in enumerate(keys)}
        data = [{"image_id": i, "test": hypotheses[key], "refs": list(references[key])} for i, key in ids.items()]
        (Path(tmp) / "in.json").write_text(json.dumps(data))
        cmd = ["java", "-jar", "-Xmx8G", "spice-1.0.jar", str(Path(tmp) / "in.json"),
               "-cache", str(Path(tmp) / "cache"), "-out", str(Path(tmp) / "out.json"), "-subset", "-silent"]
        done = subprocess.run(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise RuntimeError(f"SPICE failed: {tail[0]}")
        results = json.loads((Path(tmp) / "out.json").read_text())

    def as_float(x):
        try:
            return float(x)
        except (TypeError, ValueError):
            return float("nan")

    per_image = {ids[str(item["image_id"])]: as_float(item["scores"]["All"]["f"]) for item in results}
    values = [per_image[k] for k in keys]
    return (sum(values) / len(values) if values else float("nan")), per_image


METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def score_captions(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str],
                   java: bool = True, tokenized: bool = False) -> dict:
    """Every COCO caption metric for one caption per image against its references.

    ``references``: {image: [caption, ...]}; ``hypotheses``: {image: caption}. Captions are
    raw text, tokenised here like pycocoevalcap does, unless ``tokenized``. With ``java`` False,
    or without pycocoevalcap and Java, METEOR and SPICE are reported as unavailable.

    Returns {"metrics": {name: score or None}, "unavailable": {name: reason},
    "per_image": {image: {name: score}}} on pycocoevalcap's scale.
    """
    keys = _check(references, hypotheses)
    if tokenized:
        gts = {k: list(references[k]) for k in keys}
        res = {k: hypotheses[k] for k in keys}
    else:
        gts = tokenize({k: list(references[k]) for k in keys})
        res = {k: v[0] for k, v in tokenize({k: [hypotheses[k]] for k in keys}).items()}
    metrics: dict[str, Optional[float]] = {}
    per_image: dict[Hashable, dict[str, float]] = {k: {} for k in keys}
    unavailable: dict[str, str] = {}

    def record(name, score, scores):
        metrics[name] = score
        for k in keys:
            per_image[k][name] = scores[k]

    corpus, per = bleu(gts, res)
    for i in range(4):
        record(f"Bleu_{i + 1}", corpus[i], {k: v[i] for k, v in per.items()})
    status = java_metrics_status() if java else {"METEOR": "skipped (--no-java-metrics)",
                                                 "SPICE": "skipped (--no-java-metrics)"}
    for name, fn in (("METEOR", meteor), ("ROUGE_L", rouge_l), ("CIDEr", cider_d), ("SPICE", spice)):
        if name in status and status[name]:
            metrics[name] = None
            unavailable[name] = status[name]
            continue
        try:
            record(name, *fn(gts, res))
        except RuntimeError as err:
            if name not in status:
                raise
            metrics[name] = None
            unavailable[name] = str(err)
    return {"metrics": {name: metrics.get(name) for name in METRIC_NAMES}, "unavailable": unavailable,
            "per_image": per_image}
