"""`coca eval zeroshot|retrieval`: CLIP_benchmark's metrics, checked by hand and against open_clip."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_error_line, reference_classifier, reference_image_features, reference_text_features, run_cli

DIGITS = ["zero", "one", "two", "three", "four", "five"]


def clip_benchmark_recall(scores, caption_image, k):
    """CLIP_benchmark's zeroshot_retrieval recall, written out from its definition: recall@k per
    query as true positives in the top k over all positives, then the share of queries above 0."""
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(scores)), torch.tensor(caption_image)] = True

    def per_query(s, pos):
        onehot = torch.nn.functional.one_hot(s.topk(k, dim=1).indices, num_classes=s.shape[1])
        return (onehot * pos[:, None, :]).sum(dim=(1, 2)) / pos.sum(dim=1)

    return {f"image_retrieval_recall@{k}": (per_query(scores, positives) > 0).float().mean().item(),
            f"text_retrieval_recall@{k}": (per_query(scores.T, positives.T) > 0).float().mean().item()}


# -- recall by hand ----------------------------------------------------------------------------

def test_recall_on_a_hand_made_case():
    from coca_cli.tasks.retrieval import retrieval_recall

    scores = torch.tensor([  # 5 captions × 3 images
        [0.9, 0.1, 0.3],  # caption 0 of image 0: image 0 first
        [0.2, 0.8, 0.1],  # caption 1 of image 0: image 0 second
        [0.5, 0.4, 0.6],  # caption 2 of image 1: image 1 third
        [0.1, 0.2, 0.7],  # caption 3 of image 2: image 2 first
        [0.3, 0.9, 0.2],  # caption 4 of image 2: image 2 third
    ])
    metrics = retrieval_recall(scores, [0, 0, 1, 2, 2], ks=(1, 2, 3, 10))
    # text→image: hits at 1 = captions 0, 3; at 2 = also caption 1; at 3 = all.
    assert [metrics[f"image_retrieval_recall@{k}"] for k in (1, 2, 3, 10)] == pytest.approx([2 / 5, 3 / 5, 1, 1])
    # image→text: image 0's best caption is caption 0 (its own); image 1 ranks captions 4, 1, 2
    # (its own third); image 2's best is caption 3 (its own).
    assert [metrics[f"text_retrieval_recall@{k}"] for k in (1, 2, 3, 10)] == pytest.approx([2 / 3, 2 / 3, 1, 1])


def test_recall_matches_clip_benchmark_with_several_captions_per_image():
    from coca_cli.tasks.retrieval import retrieval_recall

    gen = torch.Generator().manual_seed(0)
    caption_image = torch.randint(0, 12, (40,), generator=gen).tolist()
    caption_image[:12] = range(12)  # every image has at least one caption
    scores = torch.randn(40, 12, generator=gen)
    ours = retrieval_recall(scores, caption_image, ks=(1, 5, 10))
    for k in (1, 5, 10):
        for name, value in clip_benchmark_recall(scores, caption_image, k).items():
            assert ours[name] == pytest.approx(value)


# -- coca eval zeroshot ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn digits as an image folder: digit_zero/, digit_one/, ... three images each."""
    from sklearn.datasets import load_digits

    data = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for label, name in enumerate(DIGITS):
        folder = root / f"digit_{name}"
        folder.mkdir()
        for n, index in enumerate(np.flatnonzero(data.target == label)[:3]):
            pixels = (data.images[index] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(folder / f"{n}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "stray.png")  # in no class folder: left out
    return root


def test_zeroshot_accuracy_matches_open_clip(tiny, digits, tmp_path, capsys):
    ref, native = tiny
    out = tmp_path / "results" / "zeroshot.json"
    assert run_cli("eval", "zeroshot", "--data", digits, "--pretrained", native, "--output", out,
                   "--batch-size", "4", "--format", "table") == 0
    captured = capsys.readouterr()
    assert "top-1 accuracy" in captured.out and "%" in captured.out
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_classification" and result["pretrained"] == str(native)
    assert (result["images"], result["classes"], result["skipped"]) == (18, 6, 0)

    paths = sorted(p for p in digits.rglob("*.png") if p.parent != digits)
    targets = torch.tensor([DIGITS.index(p.parent.name[len("digit_"):]) for p in paths])
    classifier = reference_classifier(ref, [f"digit {name}" for name in DIGITS], ["a photo of a {}."])
    logits = reference_image_features(ref, paths) @ classifier
    top1 = (logits.argmax(dim=1) == targets).float().mean().item()
    top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean().item()
    assert result["metrics"] == {"top1_zeroshot_accuracy": pytest.approx(top1),
                                 "top5_zeroshot_accuracy": pytest.approx(top5)}


def test_zeroshot_unreadable_image_is_skipped_and_reported(tiny, digits, tmp_path, capsys):
    data = tmp_path / "digits"
    shutil.copytree(digits, data)
    (data / "digit_one" / "broken.png").write_bytes(b"")
    out = tmp_path / "z.json"
    assert run_cli("eval", "zeroshot", "--data", data, "--pretrained", tiny[1], "--output", out) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"skipped {data / 'digit_one' / 'broken.png'}: ")
    assert err[-1] == "coca: error: 1 of 19 images could not be read"
    result = json.loads(out.read_text())
    assert (result["images"], result["skipped"]) == (18, 1)


def test_zeroshot_bad_folders_are_one_line(tiny, tmp_path, capsys):
    def fails(folder, message):
        assert run_cli("eval", "zeroshot", "--data", folder, "--pretrained", tiny[1]) == 2
        assert message in one_error_line(capsys)

    fails(tmp_path / "nope", "no such folder")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    fails(flat, "no class folders")
    (flat / "cat").mkdir()
    (flat / "dog").mkdir()
    fails(flat, "no images found in the class folders")
    Image.new("RGB", (8, 8)).save(flat / "cat" / "a.png")
    (flat / "hot_dog").mkdir()
    (flat / "hot dog").mkdir()
    fails(flat, "duplicate label 'hot dog'")


# -- coca eval retrieval -----------------------------------------------------------------------

@pytest.fixture
def pairs(photo_dir, tmp_path):
    """pairs.tsv beside an img/ folder; three of the five images have two captions."""
    shutil.copytree(photo_dir, tmp_path / "data" / "img")
    rows = [("astronaut.jpg", "an astronaut"), ("chelsea.jpg", "a cat"), ("astronaut.jpg", "a woman in a suit"),
            ("coffee.jpg", "a cup of coffee"), ("rocket.png", "a rocket"), ("camera.png", "a photographer"),
            ("coffee.jpg", "a hot drink"), ("rocket.png", "a launch pad")]
    lines = ["filepath\ttitle"] + [f"img/{image}\t{caption}" for image, caption in rows]
    tsv = tmp_path / "data" / "pairs.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv, rows


def test_retrieval_recall_matches_open_clip(tiny, pairs, tmp_path, capsys):
    ref, native = tiny
    tsv, rows = pairs
    out = tmp_path / "retrieval.json"
    assert run_cli("eval", "retrieval", "--data", tsv, "--pretrained", native, "--output", out, "--format", "table") == 0
    captured = capsys.readouterr()
    assert "image→text" in captured.out and "text→image" in captured.out and "R@10" in captured.out
    result = json.loads(out.read_text())
    assert (result["images"], result["captions"], result["skipped"]) == (5, 8, 0)

    images = list(dict.fromkeys(image for image, _ in rows))
    scores = (reference_text_features(ref, [caption for _, caption in rows])
              @ reference_image_features(ref, [tsv.parent / "img" / image for image in images]).T)
    caption_image = [images.index(image) for image, _ in rows]
    expected = {**clip_benchmark_recall(scores, caption_image, 1), **clip_benchmark_recall(scores, caption_image, 5)}
    expected.update({"image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0})  # 10 > candidates: all
    assert result["metrics"] == pytest.approx(expected)


def test_retrieval_custom_columns_and_separator(tiny, pairs, capsys, tmp_path):
    tsv, _ = pairs
    csv_file = tsv.parent / "pairs.csv"
    csv_file.write_text('caption,image\n"a cat, sleeping",img/chelsea.jpg\nan astronaut,img/astronaut.jpg\n')
    out = tmp_path / "r.json"
    assert run_cli("eval", "retrieval", "--data", csv_file, "--img-key", "image", "--caption-key", "caption",
                   "--separator", ",", "--pretrained", tiny[1], "--output", out) == 0
    result = json.loads(out.read_text())
    assert (result["images"], result["captions"]) == (2, 2)


def test_retrieval_unreadable_image_drops_its_captions(tiny, pairs, tmp_path, capsys):
    tsv, _ = pairs
    (tsv.parent / "img" / "coffee.jpg").write_text("not a jpeg")
    out = tmp_path / "r.json"
    assert run_cli("eval", "retrieval", "--data", tsv, "--pretrained", tiny[1], "--output", out) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"skipped {tsv.parent / 'img' / 'coffee.jpg'}: ")
    assert err[-1] == "coca: error: 1 of 5 images could not be read"
    result = json.loads(out.read_text())
    assert (result["images"], result["captions"], result["skipped"]) == (4, 6, 1)


def test_retrieval_bad_files_are_one_line(tiny, tmp_path, capsys):
    def fails(data, message, *extra):
        assert run_cli("eval", "retrieval", "--data", data, "--pretrained", tiny[1], *extra) == 2
        assert message in one_error_line(capsys)

    fails(tmp_path / "nope.tsv", "no such file")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("image\tcaption\na.jpg\ta cat\n")
    fails(tsv, "has no column 'filepath', 'title' (columns: image, caption)")
    fails(tsv, "separator must be one character", "--img-key", "image", "--caption-key", "caption",
          "--separator", ";;")
    tsv.write_text("filepath\ttitle\n")
    fails(tsv, "no image-caption pairs")
    tsv.write_text("filepath\ttitle\na.jpg\t\n")
    fails(tsv, "line 2: empty image path or caption")
    tsv.write_bytes("filepath\ttitle\na.jpg\tcafé\n".encode("latin-1"))
    fails(tsv, "is not UTF-8")


# -- output for pipes ----------------------------------------------------------------------------

def test_results_on_a_pipe_are_json_naming_the_model_of_a_weights_folder(tiny, pairs, tmp_path, capsys):
    """--pretrained a folder alone: the model is read from its config.json, not left null."""
    tsv, _ = pairs
    out = tmp_path / "r.json"
    assert run_cli("eval", "retrieval", "--data", tsv, "--pretrained", tiny[1], "--output", out) == 0
    line = json.loads(capsys.readouterr().out)
    assert line == json.loads(out.read_text())
    assert (line["model"], line["pretrained"], line["task"]) == ("coca_tiny", str(tiny[1]), "zeroshot_retrieval")
    assert run_cli("eval", "retrieval", "--data", tsv, "--pretrained", tiny[1], "--format", "tsv") == 0
    rows = [r.split("\t") for r in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["metric", "value"]
    assert {k: float(v) for k, v in rows[1:]} == pytest.approx({**line["metrics"], "images": 5, "captions": 8,
                                                               "skipped": 0})


def test_zeroshot_on_a_pipe(tiny, digits, capsys):
    assert run_cli("eval", "zeroshot", "--data", digits, "--pretrained", tiny[1]) == 0
    line = json.loads(capsys.readouterr().out)
    assert (line["model"], line["images"], line["classes"]) == ("coca_tiny", 18, 6)
    assert set(line["metrics"]) == {"top1_zeroshot_accuracy", "top5_zeroshot_accuracy"}
