"""`coca caption` end to end on real photos with a converted random-weight model."""

import csv
import json
import shutil

import pytest

from conftest import PHOTOS, ROOT, one_error_line, run_cli, subprocess_env
FAST = ["--seq-len", "8", "--min-seq-len", "2", "--num-beams", "2", "--num-beam-groups", "1"]


@pytest.fixture(scope="module")
def native(tiny):
    """The converted random-weight coca_tiny folder, as --pretrained takes it."""
    return str(tiny[1])


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in PHOTOS:
        shutil.copy(p, folder / p.name)
    return folder


def test_captions_a_folder_as_tsv(native, photos, capsys):
    assert run_cli("caption", photos, "--pretrained", native, *FAST) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(photos / p.name) for p in PHOTOS]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)


def test_same_captions_as_python_api(native, capsys):
    import torch

    from coca_cli import create_model_and_transforms, decode
    from coca_cli.data.transforms import load_image

    assert run_cli("caption", *PHOTOS, "--pretrained", native, *FAST, "--batch-size", "2") == 0
    cli = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    model, _, transform = create_model_and_transforms(None, pretrained=native)
    images = torch.stack([transform(load_image(p)) for p in PHOTOS])
    tokens = model.generate(images, seq_len=8, min_seq_len=2, num_beams=2, num_beam_groups=1)
    assert [cli[str(p)] for p in PHOTOS] == [decode(t) for t in tokens]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".txt"])
def test_output_file_formats(native, photos, tmp_path, suffix):
    out = tmp_path / f"captions{suffix}"
    assert run_cli("caption", photos, "--pretrained", native, *FAST, "--output", out) == 0
    text = out.read_text()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines()]
        assert {r["image"] for r in rows} == {str(photos / p.name) for p in PHOTOS}
        assert all(r["caption"] for r in rows)
    elif suffix in (".csv", ".tsv"):  # real CSV/TSV: a header, then one row per image
        rows = list(csv.reader(text.splitlines(), delimiter="," if suffix == ".csv" else "\t"))
        assert rows[0] == ["image", "caption"] and len(rows) == 1 + len(PHOTOS)
        assert {r[0] for r in rows[1:]} == {str(photos / p.name) for p in PHOTOS} and all(r[1] for r in rows[1:])
    else:
        assert len(text.splitlines()) == len(PHOTOS)


def test_json_lines_on_stdout(native, photos, capsys):
    assert run_cli("caption", photos / "coffee.jpg", "--pretrained", native, *FAST, "--json") == 0
    row = json.loads(capsys.readouterr().out)
    assert row["image"].endswith("coffee.jpg") and isinstance(row["caption"], str)


def test_bad_files_are_reported_and_the_rest_captioned(native, photos, tmp_path, capsys):
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.jpg").write_text("this is not an image")
    data = (photos / "chelsea.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 3])
    out = tmp_path / "c.jsonl"
    assert run_cli("caption", photos, "--pretrained", native, *FAST, "--output", out) == 1
    err = capsys.readouterr().err.splitlines()
    assert sorted(line.split(":")[0] for line in err[:-1]) == sorted(
        f"skipped {photos / n}" for n in ("empty.jpg", "notes.jpg", "truncated.jpg"))
    assert "empty file" in "\n".join(err) and "not an image" in "\n".join(err)
    assert err[-1] == "coca: error: 3 of 6 images could not be captioned"
    assert len(out.read_text().splitlines()) == len(PHOTOS)


def test_resume_skips_done_images_and_repairs_a_cut_line(native, photos, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert run_cli("caption", photos / "astronaut.jpg", "--pretrained", native, *FAST, "--output", out) == 0
    first = out.read_text()
    with open(out, "a") as f:
        f.write('{"image": "' + str(photos / "chelsea.jpg") + '", "capt')  # killed mid-write
    assert run_cli("caption", photos, "--pretrained", native, *FAST, "--output", out, "--resume") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.read_text().startswith(first)
    assert sorted(r["image"] for r in rows) == sorted(str(photos / p.name) for p in PHOTOS)
    capsys.readouterr()
    assert run_cli("caption", photos, "--pretrained", native, *FAST, "--output", out, "--resume") == 0
    assert "already captioned" in capsys.readouterr().err


def test_seeded_sampling_is_reproducible(native, photos, capsys):
    args = ["caption", photos, "--pretrained", native, "--generation-type", "top_p", "--top-p", "0.9",
            "--temperature", "1.5", "--seq-len", "10", "--seed", "3"]
    assert run_cli(*args) == 0
    first = capsys.readouterr().out
    assert run_cli(*args) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("args, message", [
    (["--num-beams", "5", "--num-beam-groups", "3"], "--num-beams (5) must be a positive multiple of --num-beam-groups"),
    (["--seq-len", "5", "--min-seq-len", "5"], "--seq-len (5) must be larger than --min-seq-len (5)"),
    (["--generation-type", "top_p", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--num-beams", "1", "--num-beam-groups", "1"], "use --generation-type top_k for greedy"),
    (["--generation-type", "greedy"], "--generation-type must be one of beam_search, top_k, top_p, not 'greedy'"),
    # the model (coca_tiny) reads 32 tokens: a caption has at most 33, counting start and end
    (["--seq-len", "40"], "--seq-len 40 is too long for this model, whose captions have at most 33 tokens "
                          "(start and end included): use --seq-len <= 33"),
    (["--seq-len", "40", "--generation-type", "top_k"], "use --seq-len <= 33\n"),
])
def test_invalid_generation_settings_are_one_line_in_option_spelling(native, args, message, capsys):
    assert run_cli("caption", PHOTOS[0], "--pretrained", native, *args) == 2
    err = one_error_line(capsys)
    assert message in err and "='" not in err  # no generation_type='top_k'
    python_names = ("generation_type", "seq_len", "num_beams", "num_beam_groups", "repetition_penalty", "top_p must")
    assert not [name for name in python_names if name in err]


def test_seq_len_defaults_to_what_the_model_allows(tmp_path, capsys):
    """A model reading only 16 tokens captions with seq_len 17, not the usual 30 it cannot run."""
    import torch

    from coca_cli import create_model
    from coca_cli.weights.checkpoint import save_native

    config = json.loads((ROOT / "models" / "coca_tiny.json").read_text())
    config["text_cfg"]["context_length"] = config["multimodal_cfg"]["context_length"] = 16
    (tmp_path / "short.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = create_model(str(tmp_path / "short.json"))
    save_native(model, model.config, tmp_path / "short")
    assert run_cli("caption", PHOTOS[0], "--pretrained", tmp_path / "short", "--num-beams", "2",
                   "--num-beam-groups", "1", "--json") == 0
    assert json.loads(capsys.readouterr().out)["image"] == str(PHOTOS[0])


def test_progress_lines_when_stderr_is_not_a_terminal(native, photo_dir, monkeypatch, capsys):
    """Plain lines for logs, with the time left from the time per image so far (a fake clock that
    ticks 10 s per reading: 10 s an image)."""
    import itertools

    from coca_cli.cli import progress

    ticks = itertools.count(0, 10)
    monkeypatch.setattr(progress, "clock", staticmethod(lambda: next(ticks)))
    monkeypatch.setattr(progress, "every_s", 20)
    assert run_cli("caption", photo_dir, "--pretrained", native, *FAST, "--batch-size", "4") == 0
    assert capsys.readouterr().err.splitlines() == [
        "captioning: 2/5 (40%), 0:00:20 elapsed, 0:00:30 left",
        "captioning: 4/5 (80%), 0:00:40 elapsed, 0:00:10 left",
    ]


@pytest.mark.parametrize("name", ["c.xlsx", "captions"])
def test_unsupported_output_type(native, tmp_path, capsys, name):
    assert run_cli("caption", PHOTOS[0], "--pretrained", native, "--output", tmp_path / name) == 2
    assert "unsupported output file type" in one_error_line(capsys)
    assert not (tmp_path / name).exists()


def _write_shards(folder, photos):
    """Three shards: real photos, one corrupt image, one sample with no image at all."""
    import io
    import tarfile

    folder.mkdir()
    samples = [(p.stem, "jpg", p.read_bytes()) for p in photos]
    samples += [("broken", "jpg", photos[0].read_bytes()[:200]), ("textonly", "txt", b"no image here")]
    for i in range(3):
        with tarfile.open(folder / f"train-{i:04d}.tar", "w") as tar:
            for key, ext, data in samples[i::3]:
                info = tarfile.TarInfo(f"{i}_{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def _shard_captions(out):
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(out.glob("*.jsonl"))}


def test_shards_get_one_output_each_and_are_resumed(native, tmp_path, capsys):
    import torch

    from coca_cli import create_model_and_transforms, decode
    from coca_cli.data.transforms import load_image

    shards = _write_shards(tmp_path / "shards", PHOTOS)
    out = tmp_path / "captions"
    assert run_cli("caption", "--data", shards, "--output", out, "--pretrained", native, *FAST) == 0
    captions = _shard_captions(out)
    assert list(captions) == ["train-0000.jsonl", "train-0001.jsonl", "train-0002.jsonl"]
    assert not list(out.glob("*.part"))
    by_key = {row["key"]: row["caption"] for rows in captions.values() for row in rows}
    assert sorted(by_key) == sorted(f"{i}_{p.stem}" for i, p in enumerate(PHOTOS))
    model, _, transform = create_model_and_transforms(None, pretrained=native)
    tokens = model.generate(torch.stack([transform(load_image(p)) for p in PHOTOS]), seq_len=8, min_seq_len=2,
                            num_beams=2, num_beam_groups=1)
    assert [by_key[f"{i}_{p.stem}"] for i, p in enumerate(PHOTOS)] == [decode(t) for t in tokens]
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image" in err and "skipped 1 no image" in err

    (out / "train-0001.jsonl").unlink()
    assert run_cli("caption", "--data", shards, "--output", out, "--pretrained", native, *FAST) == 0
    assert capsys.readouterr().err.strip() == "train-0001.tar: 1 captioned, skipped 1 no image"
    assert _shard_captions(out) == captions
    assert run_cli("caption", "--data", shards, "--output", out, "--pretrained", native, *FAST) == 0
    assert "all 3 shards are already captioned" in capsys.readouterr().err


def test_shards_split_over_two_processes_through_torchrun(native, tmp_path):
    import subprocess
    import sys

    shards = _write_shards(tmp_path / "shards", PHOTOS)
    single, double = tmp_path / "one", tmp_path / "two"
    assert run_cli("caption", "--data", shards, "--output", single, "--pretrained", native, *FAST) == 0
    result = subprocess.run([sys.executable, "-m", "coca_cli", "caption", "--data", str(shards), "--output", str(double),
                             "--pretrained", native, *FAST, "--gpus", "2", "--device", "cpu"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=1800,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert _shard_captions(double) == _shard_captions(single)


def test_each_slurm_task_captions_its_share_of_the_shards(native, tmp_path, capsys, monkeypatch):
    """Under `srun --ntasks 2` (no relaunch: SLURM started the processes) task 1 takes every second
    shard from the second on, as a torchrun rank does; it used to caption all of them."""
    shards = _write_shards(tmp_path / "shards", PHOTOS)
    out = tmp_path / "captions"
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert run_cli("caption", "--data", shards, "--output", out, "--pretrained", native, *FAST, "--device", "cpu") == 0
    assert [p.name for p in sorted(out.glob("*.jsonl"))] == ["train-0001.jsonl"]
    assert capsys.readouterr().err.strip() == "train-0001.tar: 1 captioned, skipped 1 no image"


def test_shard_options_need_an_output_folder(native, tmp_path, capsys):
    assert run_cli("caption", "--data", tmp_path, "--pretrained", native) == 2
    assert "--data needs --output DIR" in capsys.readouterr().err
    assert run_cli("caption", PHOTOS[0], "--data", tmp_path, "--output", tmp_path / "o", "--pretrained", native) == 2
    assert "not both" in capsys.readouterr().err
