"""Learning on real data no one here wrote: scikit-learn's handwritten digits.

The 1797 8x8 digits are upscaled to 64x64 RGB images captioned "the digit seven" etc.; 300 are
held out. A tiny CoCa is trained from scratch through `coca train` on CPU, then judged only through
the other commands on the held-out images:

* `coca classify` (zero-shot, prompt template "the digit {}"): >= 90% right;
* `coca caption` (beam search): >= 90% of captions name the right digit and no other.

The model is a test config written here, not a shipped one: coca_tiny's shape with 32-pixel
patches (a 2x2 grid; 16-pixel patches learn about twice as slowly) and a context of 5 tokens
(the captions are 5 tokens with start and end; the 49408-way vocabulary projection dominates the
cost and scales with the context length). About a minute of training on two cores.
"""

import json
import time

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
HELD_OUT = 300

CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "head_width": 32, "patch_size": 32,
                   "attentional_pool": True, "attn_pooler_queries": 16, "attn_pooler_heads": 4,
                   "output_tokens": True},
    "text_cfg": {"context_length": 5, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 5, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                       "attn_pooler_heads": 4},
    "custom_text": True,
}

TRAIN = ["--batch-size", "32", "--epochs", "8", "--lr", "1e-3", "--warmup", "10", "--wd", "0.1",
         "--coca-caption-loss-weight", "1", "--coca-contrastive-loss-weight", "1", "--precision", "fp32",
         "--workers", "0", "--seed", "0", "--keep", "1", "--log-every-n-steps", "50"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    order = np.random.RandomState(0).permutation(len(data.target))
    held_out = set(order[:HELD_OUT].tolist())
    rows = {"train": ["filepath,title"], "test": ["filepath,title"]}
    labels = {}
    for i, (pixels, target) in enumerate(zip(data.images, data.target)):
        image = Image.fromarray((pixels / 16 * 255).astype(np.uint8), "L").resize((64, 64), Image.BICUBIC)
        split = "test" if i in held_out else "train"
        path = root / split / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        image.convert("RGB").save(path)
        rows[split].append(f"{path},the digit {WORDS[target]}")
        labels[str(path)] = WORDS[target]
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (root / "coca_digits.json").write_text(json.dumps(CONFIG))
    return root, {p: w for p, w in labels.items() if "/test/" in p}


def names_only(caption: str, word: str) -> bool:
    said = caption.split()
    return word in said and sum(w in said for w in WORDS) == 1


def test_a_tiny_coca_learns_digits_zero_shot_and_captions(digits, capsys):
    root, truth = digits
    run = root / "run"
    start = time.perf_counter()
    assert run_cli("train", "--model", root / "coca_digits.json", "--data", root / "train.csv", "--output", run,
                   "--val-data", root / "test.csv", "--val-num-samples", "100", *TRAIN) == 0
    trained = time.perf_counter() - start
    capsys.readouterr()

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
    total = time.perf_counter() - start
    print(f"trained in {trained:.0f}s, {total:.0f}s in all: zero-shot {accuracy:.1%}, captions {named:.1%}")

    assert accuracy >= 0.9, f"zero-shot accuracy {accuracy:.1%}"
    assert named >= 0.9, f"captions naming the right digit: {named:.1%}"
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(val) == 8 and val[-1]["image_to_text_R@5"] > val[0]["image_to_text_R@5"] - 1e-9
    assert val[-1]["val_caption_loss"] < val[0]["val_caption_loss"] and len(val[-1]["captions"]) == 3
