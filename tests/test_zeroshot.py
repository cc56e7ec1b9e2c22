"""`coca classify` and the zero-shot helpers: the same probabilities as open_clip on the same weights."""

import csv
import io
import json
import shutil

import pytest
import torch

from conftest import PHOTOS, one_error_line, reference_classifier, reference_probs, run_cli

LABELS = ["cat", "coffee", "astronaut", "rocket", "camera man", "dog"]


# -- the library -------------------------------------------------------------------------------

def test_templates_are_openais_80_prompts():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as LAMBDAS

    from coca_cli.tasks.templates import DEFAULT_TEMPLATE, OPENAI_IMAGENET_TEMPLATES, fill

    assert [fill(t, "tench") for t in OPENAI_IMAGENET_TEMPLATES] == [f("tench") for f in LAMBDAS]
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and DEFAULT_TEMPLATE == "a photo of a {}."


@pytest.mark.parametrize("template_set", ["default", "imagenet"])
def test_classifier_and_probabilities_match_open_clip(tiny, template_set):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from coca_cli import create_model_and_transforms, get_tokenizer
    from coca_cli.tasks.embeddings import embed_images
    from coca_cli.tasks.templates import load_templates
    from coca_cli.tasks.zeroshot import build_classifier, classify

    ref, native = tiny
    classnames = list(IMAGENET_CLASSNAMES[::83])  # 13 classes: open_clip encodes them 10 at a time
    templates = load_templates(template_set)
    model, _, transform = create_model_and_transforms(None, pretrained=native)
    weights = build_classifier(model, get_tokenizer(None, pretrained=str(native)), classnames, templates)
    expected = reference_classifier(ref, classnames, templates)
    assert weights.shape == expected.shape == (64, len(classnames))
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-5)

    probs = classify(model, embed_images(model, transform, PHOTOS).features, weights)
    torch.testing.assert_close(probs, reference_probs(ref, PHOTOS, classnames, templates), rtol=0, atol=1e-5)


def test_top_labels_and_accuracy_on_a_hand_made_case():
    from coca_cli.tasks.zeroshot import top_labels, zeroshot_accuracy

    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert top_labels(probs, ["a", "b", "c"], 2) == [[("b", pytest.approx(0.7)), ("c", pytest.approx(0.2))],
                                                     [("a", pytest.approx(0.5)), ("c", pytest.approx(0.3))]]
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # class 0 first: top-1 hit
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],   # class 4 fifth: top-5 hit only
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],   # class 5 last: miss
                           [0.0, 0.0, 0.0, 0.9, 0.1, 0.2]])  # class 5 second: top-5 hit only
    metrics = zeroshot_accuracy(logits, torch.tensor([0, 4, 5, 5]))
    assert metrics == {"top1_zeroshot_accuracy": 0.25, "top5_zeroshot_accuracy": 0.75}
    assert zeroshot_accuracy(logits[:, :3], torch.tensor([0, 1, 2, 0]))["top5_zeroshot_accuracy"] is None


def test_label_text_is_embedded_once_per_run(tiny, photo_dir, monkeypatch, capsys):
    from coca_cli.model.coca import CoCa

    calls = []
    original = CoCa.encode_text
    monkeypatch.setattr(CoCa, "encode_text", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert run_cli("classify", photo_dir, "--labels", ",".join(LABELS), "--pretrained", tiny[1],
                   "--batch-size", "1", "--json") == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert len(calls) == 1


# -- coca classify -----------------------------------------------------------------------------

def test_cli_probabilities_match_open_clip(tiny, photo_dir, capsys):
    ref, native = tiny
    assert run_cli("classify", photo_dir, "--labels", ",".join(LABELS), "--pretrained", native,
                   "--json", "--top-k", "3", "--batch-size", "2") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    paths = sorted(photo_dir.iterdir())
    assert [row["image"] for row in rows] == [str(p) for p in paths]
    expected = reference_probs(ref, paths, LABELS, ["a photo of a {}."])
    for row, probs in zip(rows, expected):
        best = probs.topk(3)
        assert [p["label"] for p in row["predictions"]] == [LABELS[i] for i in best.indices]
        torch.testing.assert_close(torch.tensor([p["probability"] for p in row["predictions"]]), best.values,
                                   rtol=0, atol=1e-5)


def test_cli_imagenet_templates_and_labels_file(tiny, tmp_path, capsys):
    from coca_cli.tasks.templates import OPENAI_IMAGENET_TEMPLATES

    ref, native = tiny
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS[:3]) + "\n\n  \ncafé crème\n", encoding="utf-8")
    assert run_cli("classify", *PHOTOS, "--labels-file", labels, "--templates", "imagenet", "--pretrained", native,
                   "--json", "--top-k", "10") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = LABELS[:3] + ["café crème"]
    expected = reference_probs(ref, PHOTOS, names, OPENAI_IMAGENET_TEMPLATES)
    for row, probs in zip(rows, expected):
        got = {p["label"]: p["probability"] for p in row["predictions"]}
        assert list(got) == sorted(got, key=got.get, reverse=True) and set(got) == set(names)
        torch.testing.assert_close(torch.tensor([got[n] for n in names]), probs, rtol=0, atol=1e-5)


def test_cli_templates_file(tiny, tmp_path, capsys):
    ref, native = tiny
    templates = tmp_path / "templates.txt"
    templates.write_text("a sketch of a {}.\n{c} in the wild\n", encoding="utf-8")
    assert run_cli("classify", PHOTOS[0], "--labels", "cat,dog", "--templates", templates, "--pretrained", native,
                   "--json") == 0
    row = json.loads(capsys.readouterr().out)
    expected = reference_probs(ref, PHOTOS[:1], ["cat", "dog"], ["a sketch of a {}.", "{} in the wild"])[0]
    got = {p["label"]: p["probability"] for p in row["predictions"]}
    torch.testing.assert_close(torch.tensor([got["cat"], got["dog"]]), expected, rtol=0, atol=1e-5)


def test_cli_table_output(tiny, capsys):
    assert run_cli("classify", PHOTOS[1], "--labels", "cat,[bold]dog,car", "--pretrained", tiny[1], "--top-k", "2",
                   "--format", "table") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{PHOTOS[1]}\n") and "probability" in out
    assert "│ 2 │" in out and "│ 3 │" not in out  # --top-k 2
    assert run_cli("classify", PHOTOS[1], "--labels", "cat,[bold]dog,car", "--pretrained", tiny[1],
                   "--format", "table") == 0
    assert "[bold]dog" in capsys.readouterr().out  # labels are shown as text, never as rich markup


def test_unreadable_image_is_reported_and_the_rest_classified(tiny, photo_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(photo_dir, folder)
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    assert run_cli("classify", folder, "--labels", "cat,dog", "--pretrained", tiny[1], "--json") == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 5
    err = captured.err.splitlines()
    assert err[0].startswith(f"skipped {folder / 'broken.jpg'}: ")
    assert err[-1] == "coca: error: 1 of 6 images could not be read"
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("args, message", [
    (["--labels", " , ,"], "the label list is empty"),
    (["--labels", "cat,dog,cat"], "duplicate label 'cat'"),
    ([], "no labels"),
    (["--labels", "cat", "--labels-file", "x.txt"], "not both"),
    (["--labels-file", "no-such-labels.txt"], "no such labels file"),
    (["--labels", "cat", "--templates", "no-such-set"], "unknown templates 'no-such-set'"),
])
def test_bad_labels_are_one_line(tiny, args, message, capsys):
    assert run_cli("classify", PHOTOS[0], "--pretrained", tiny[1], *args) == 2
    assert message in one_error_line(capsys)


def test_bad_label_and_template_files_are_one_line(tiny, tmp_path, capsys):
    latin1 = tmp_path / "labels.txt"
    latin1.write_bytes("café\nthé\n".encode("latin-1"))
    assert run_cli("classify", PHOTOS[0], "--pretrained", tiny[1], "--labels-file", latin1) == 2
    assert "is not UTF-8" in one_error_line(capsys)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    assert run_cli("classify", PHOTOS[0], "--pretrained", tiny[1], "--labels-file", blank) == 2
    assert "is empty" in one_error_line(capsys)
    no_slot = tmp_path / "templates.txt"
    no_slot.write_text("a photo of a {}.\na photo\n")
    assert run_cli("classify", PHOTOS[0], "--pretrained", tiny[1], "--labels", "a,b", "--templates", no_slot) == 2
    assert "template 'a photo'" in one_error_line(capsys)


def test_missing_or_empty_inputs_are_one_line(tiny, tmp_path, capsys):
    assert run_cli("classify", tmp_path / "nope", "--labels", "a,b", "--pretrained", tiny[1]) == 2
    assert "no such file or directory" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert run_cli("classify", tmp_path / "empty", "--labels", "a,b", "--pretrained", tiny[1]) == 2
    assert "no images found" in one_error_line(capsys)


@pytest.mark.parametrize("command", [["classify"], ["retrieve"], ["eval"], ["eval", "zeroshot"], ["eval", "retrieval"]])
def test_help_shows_an_example(command, capsys):
    assert run_cli(*command, "--help") == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"coca {' '.join(command)}" in out


# -- output for pipes and files ------------------------------------------------------------------

def test_pipes_get_json_lines_and_tsv_on_request(tiny, capsys):
    """stdout is not a terminal here: JSON Lines by default, never a table."""
    args = ["classify", *PHOTOS, "--labels", "cat,dog,tab\there", "--pretrained", tiny[1], "--top-k", "2"]
    assert run_cli(*args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in PHOTOS]
    assert all(len(row["predictions"]) == 2 for row in rows)
    assert run_cli(*args, "--format", "tsv") == 0
    tsv = list(csv.reader(io.StringIO(capsys.readouterr().out), delimiter="\t"))
    assert tsv[0] == ["image", "rank", "label", "probability"]
    assert [(r[0], r[1], r[2]) for r in tsv[1:]] == [(str(row["image"]), str(rank), p["label"]) for row in rows
                                                      for rank, p in enumerate(row["predictions"], start=1)]
    assert run_cli(*args, "--json", "--format", "tsv") == 2
    assert "--json means --format jsonl" in one_error_line(capsys)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_output_file_by_suffix(tiny, tmp_path, capsys, suffix):
    out = tmp_path / "results" / f"labels{suffix}"
    assert run_cli("classify", *PHOTOS, "--labels", "cat,dog", "--pretrained", tiny[1], "--output", out) == 0
    assert capsys.readouterr().out == ""
    assert run_cli("classify", *PHOTOS, "--labels", "cat,dog", "--pretrained", tiny[1], "--json") == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    if suffix == ".jsonl":
        assert [json.loads(line) for line in out.read_text().splitlines()] == expected
    else:
        rows = list(csv.DictReader(io.StringIO(out.read_text()), delimiter="," if suffix == ".csv" else "\t"))
        assert [(r["image"], r["rank"], r["label"]) for r in rows] == [
            (e["image"], str(rank), p["label"]) for e in expected for rank, p in enumerate(e["predictions"], start=1)]
        assert [float(r["probability"]) for r in rows] == [p["probability"] for e in expected for p in e["predictions"]]


@pytest.mark.parametrize("name", ["labels.txt", "labels.xlsx", "labels"])
def test_unknown_output_suffix_is_a_usage_error(tiny, tmp_path, capsys, name):
    assert run_cli("classify", PHOTOS[0], "--labels", "cat,dog", "--pretrained", tiny[1], "--output",
                   tmp_path / name) == 2
    assert "unsupported output file type" in one_error_line(capsys) and not (tmp_path / name).exists()


def test_progress_lines_in_logs(tiny, photo_dir, monkeypatch, capsys):
    from coca_cli.cli import progress

    monkeypatch.setattr(progress, "every_s", 0)  # a line per batch
    assert run_cli("classify", photo_dir, "--labels", "cat,dog", "--pretrained", tiny[1], "--batch-size", "2") == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["embedding images: 2/5 (40%)", "embedding images: 4/5 (80%)",
                                                      "embedding images: 5/5 (100%)"]
