"""Learning on real data no one here wrote: scikit-learn's handwritten digits.

The 1797 8x8 digits are upscaled to 64x64 RGB images captioned "the digit seven" etc.; 300 are
held out. A tiny CoCa is trained from scratch through `coca train` on CPU, then judged only through
the other commands on the held-out images:

* `coca classify` (zero-shot, prompt template "the digit {}"): >= 90% right;
* `coca caption` (beam search): >= 90% of captions name the right digit and no other.

The model is a test config written in conftest.py, not a shipped one: coca_tiny's shape with 32-pixel
patches (a 2x2 grid; 16-pixel patches learn about twice as slowly) and a context of 5 tokens
(the captions are 5 tokens with start and end; the 49408-way vocabulary projection dominates the
cost and scales with the context length). About a minute of training on two cores, done once a
session by conftest's ``trained_digits`` (other tests reuse the model).
"""

import json
import time

import numpy as np

from conftest import DIGIT_WORDS as WORDS, HELD_OUT_DIGITS as HELD_OUT, run_cli


def names_only(caption: str, word: str) -> bool:
    said = caption.split()
    return word in said and sum(w in said for w in WORDS) == 1


def test_a_tiny_coca_learns_digits_zero_shot_and_captions(trained_digits, capsys):
    root, truth, run = trained_digits.root, trained_digits.truth, trained_digits.run
    start = time.perf_counter()
    (root / "template.txt").write_text("the digit {}\n")
    assert run_cli("classify", root / "test", "--labels", ",".join(WORDS), "--templates", root / "template.txt",
                   "--pretrained", run / "final", "--json", "--top-k", "1") == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(predictions) == HELD_OUT
    accuracy = np.mean([p["predictions"][0]["label"] == truth[p["image"]] for p in predictions])

    assert run_cli("caption", root / "test", "--pretrained", run / "final", "--seq-len", "6", "--min-seq-len", "2",
                   "--output", root / "captions.jsonl") == 0
    captions = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == HELD_OUT
    named = np.mean([names_only(c["caption"], truth[c["image"]]) for c in captions])
    judged = time.perf_counter() - start
    print(f"trained in {trained_digits.seconds:.0f}s, judged in {judged:.0f}s: zero-shot {accuracy:.1%}, "
          f"captions {named:.1%}")

    assert accuracy >= 0.9, f"zero-shot accuracy {accuracy:.1%}"
    assert named >= 0.9, f"captions naming the right digit: {named:.1%}"
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(val) == 8 and val[-1]["image_to_text_R@5"] > val[0]["image_to_text_R@5"] - 1e-9
    assert val[-1]["val_caption_loss"] < val[0]["val_caption_loss"] and len(val[-1]["captions"]) == 3
