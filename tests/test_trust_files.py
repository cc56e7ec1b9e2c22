"""Issue 13, classes 4, 5 and 7: coca writes only into files and folders it owns, never uses a
damaged index or run file, and reports a full disk as one line with the results kept."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import PHOTOS, one_error_line, run_cli, subprocess_env

NO_SPACE = "No space left on device"


def search(native, collection, index, query="a cat"):
    return ["retrieve", "--images", collection, "--index", index, "--query", query, "--top-k", "10", "--json",
            "--pretrained", native]


def tree(folder) -> dict:
    """Every file under ``folder`` with its bytes: what 'nothing was lost or changed' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def collection(photo_dir, tmp_path):
    folder = tmp_path / "collection"
    shutil.copytree(photo_dir, folder)
    return folder


@pytest.fixture
def pairs(tmp_path):
    """Four image-caption pairs, for train and eval."""
    rows = ["filepath,title"] + [f"{PHOTOS[i % 3]},photo number {i}" for i in range(4)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


# -- class 4: never overwrite a file or folder coca does not own ---------------------------------

@pytest.mark.parametrize("victim", ["weights", "photo", "text", "folder"])
def test_retrieve_index_refuses_a_file_that_is_not_an_index(tiny, collection, tmp_path, victim, capsys):
    target = {"weights": tiny[1] / "model.safetensors", "photo": PHOTOS[0], "text": None, "folder": None}[victim]
    index = tmp_path / "victim"
    if victim == "folder":
        index.mkdir()
        (index / "keep.txt").write_text("mine")
    elif victim == "text":
        index.write_text("my notes\n")
    else:
        shutil.copy(target, index)
    before = tree(tmp_path / "victim") if victim == "folder" else index.read_bytes()
    assert run_cli(*search(tiny[1], collection, index)) == 2
    err = one_error_line(capsys)
    assert str(index) in err and ("not a coca index" in err or "is a folder" in err)
    assert (tree(index) if victim == "folder" else index.read_bytes()) == before


def test_retrieve_index_may_replace_an_empty_file_or_an_index(tiny, collection, tmp_path, capsys):
    index = tmp_path / "empty.idx"
    index.write_bytes(b"")
    assert run_cli(*search(tiny[1], collection, index)) == 0
    assert index.read_bytes().startswith(b"coca-image-index/")
    assert run_cli(*search(tiny[1], collection, index)) == 0  # its own index: reused, replaced when it changes


@pytest.mark.parametrize("command", ["convert-native", "convert-openclip", "train", "finetune"])
def test_folders_holding_other_files_are_not_written_into(tiny, pairs, tmp_path, command, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(PHOTOS[0], folder / "model.safetensors")  # even under a name coca writes
    (folder / "thesis.tex").write_text("years of work")
    before = tree(folder)
    args = {"convert-native": ["convert", tiny[1], "--output", folder],
            "convert-openclip": ["convert", tiny[1], "--to", "openclip", "--output", folder],
            "train": ["train", "--model", "coca_tiny", "--data", pairs, "--workers", "0", "--output", folder],
            "finetune": ["finetune", "--pretrained", tiny[1], "--data", pairs, "--workers", "0", "--output",
                         folder]}[command]
    assert run_cli(*args) == 2
    err = one_error_line(capsys)
    assert str(folder) in err and "thesis.tex" in err
    assert tree(folder) == before


def test_a_file_is_no_output_folder_and_folders_coca_wrote_are_written_again(tiny, tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    shutil.copy(PHOTOS[0], photo)
    assert run_cli("convert", tiny[1], "--output", photo) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert photo.read_bytes() == PHOTOS[0].read_bytes()
    out = tmp_path / "w"
    assert run_cli("convert", tiny[1], "--output", out) == 0
    (out / ".model.safetensors.abc123.tmp").write_bytes(b"left by a killed run")
    assert run_cli("convert", tiny[1], "--output", out) == 0
    assert run_cli("convert", tiny[1], "--to", "openclip", "--output", out) == 0


# -- class 5: a damaged index is rebuilt with one warning, never used ----------------------------

def rewrite_index(path, edit_header=None, edit_values=None):
    """Rewrite an index file with a VALID checksum after changing it: only validation can catch it."""
    magic, _, header, values = path.read_bytes().split(b"\n", 3)
    header = json.loads(header)
    if edit_header:
        edit_header(header)
    features = torch.frombuffer(bytearray(values), dtype=torch.float32)
    if edit_values:
        edit_values(features)
    body = json.dumps(header).encode() + b"\n" + features.numpy().tobytes()
    path.write_bytes(magic + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def flip_byte_in_features(path):
    data = bytearray(path.read_bytes())
    data[-17] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped feature byte": flip_byte_in_features,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
    "cut inside the first line": lambda p: p.write_bytes(p.read_bytes()[:7]),
    "NaN inside": lambda p: rewrite_index(p, edit_values=lambda f: f.__setitem__(3, float("nan"))),
    "wrong shape": lambda p: rewrite_index(p, edit_header=lambda h: h.__setitem__("shape", [h["shape"][0], 7])),
    "paths and rows disagree": lambda p: rewrite_index(p, edit_header=lambda h: h["paths"].pop()),
    "header not JSON": lambda p: p.write_bytes(p.read_bytes().replace(b'{"model"', b'{"mod\x00l', 1)),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_index_is_rebuilt_with_one_warning(tiny, collection, tmp_path, damage, capsys):
    index = tmp_path / "photos.idx"
    assert run_cli(*search(tiny[1], collection, index)) == 0
    clean = json.loads(capsys.readouterr().out)
    DAMAGE[damage](index)
    assert run_cli(*search(tiny[1], collection, index)) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"rebuilding the index {index}" in warnings[0], captured.err
    assert "embedded 5 new images, reused 0" in captured.err  # nothing taken from the damaged file
    hits = json.loads(captured.out)["hits"]
    assert [h["image"] for h in hits] == [h["image"] for h in clean["hits"]]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in clean["hits"]], abs=1e-5)
    assert run_cli(*search(tiny[1], collection, index)) == 0  # the rebuilt index is whole again
    captured = capsys.readouterr()
    assert "reused 5" in captured.err and "warning" not in captured.err


@pytest.mark.parametrize("damage", ["not UTF-8", "not objects"])
def test_damaged_lines_of_a_resumed_runs_metrics_are_dropped(pairs, tmp_path, damage, capsys):
    run = tmp_path / "run"
    fast = ["--model", "coca_tiny", "--data", pairs, "--workers", "0", "--batch-size", "2", "--warmup", "1",
            "--log-every-n-steps", "1", "--output", run]
    assert run_cli("train", *fast, "--epochs", "1") == 0
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + ({"not UTF-8": b"\xff\xfe{\n", "not objects": b"[1, 2]\n7\n"}[damage]))
    assert run_cli("train", *fast, "--epochs", "2", "--resume", "latest") == 0
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    assert all(isinstance(r, dict) for r in records)
    assert [r["step"] for r in records if "split" not in r] == [1, 2, 3, 4]  # the good lines kept, in order


# -- class 7: a full disk is one line naming the file, results kept, nothing earlier lost --------

class FullDisk:
    """A small filesystem for one test, at ``path``: a tmpfs mounted when running as root (and mount
    works), else a stub in which writes under ``path`` beyond the free bytes raise OSError(ENOSPC)
    (safetensors' writer as it reports it). ``fill(leave)`` leaves ``leave`` bytes free."""

    def __init__(self, root, monkeypatch):
        self.root, self.path = root, root / "disk"
        self.root.mkdir(exist_ok=True)
        self.mounted = os.geteuid() == 0 and not os.environ.get("COCA_TEST_STUB_DISK") and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(self.root)], capture_output=True).returncode == 0
        self.path.mkdir()
        self.free = None  # stub: bytes left, None while unlimited
        if not self.mounted:
            self._stub(monkeypatch)

    def fill(self, leave: int) -> None:
        if not self.mounted:
            self.free = leave
            return
        (self.root / "filler").unlink(missing_ok=True)
        stat = os.statvfs(self.root)
        with open(self.root / "filler", "wb") as filler:
            filler.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=True)

    def _spend(self, size: int) -> None:
        if self.free is not None:
            if size > self.free:
                self.free = 0
                raise OSError(errno.ENOSPC, NO_SPACE)
            self.free -= size

    def _stub(self, monkeypatch) -> None:
        from safetensors import SafetensorError

        from coca_cli.weights import checkpoint

        disk, real_open, real_save_file = self, builtins.open, checkpoint.save_file

        class Writer:
            def __init__(self, file):
                self._file = file

            def write(self, data):
                disk._spend(len(data))
                return self._file.write(data)

            def __getattr__(self, name):
                return getattr(self._file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._file.close()

            def __iter__(self):
                return iter(self._file)

        def stub_open(file, mode="r", *args, **kwargs):
            opened = real_open(file, mode, *args, **kwargs)
            inside = isinstance(file, (str, os.PathLike)) and str(os.path.abspath(file)).startswith(str(disk.path))
            return Writer(opened) if inside and any(m in mode for m in "wax+") else opened

        def stub_save_file(tensors, filename, metadata=None):
            if str(filename).startswith(str(disk.path)):
                try:
                    disk._spend(sum(t.numel() * t.element_size() for t in tensors.values()))
                except OSError:
                    raise SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error 28)") from None
            real_save_file(tensors, filename, metadata=metadata)

        monkeypatch.setattr(builtins, "open", stub_open)
        monkeypatch.setattr(io, "open", stub_open)
        monkeypatch.setattr(checkpoint, "save_file", stub_save_file)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    full = FullDisk(tmp_path / "small", monkeypatch)
    try:
        yield full
    finally:
        full.close()


def no_space_line(capsys, path) -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("coca: error:")]
    assert len(err) == 1 and f"cannot write {path}: {NO_SPACE}" in err[0], captured.err
    assert "unexpected" not in captured.err and "inline_container" not in captured.err
    return captured.out


def no_temp_files(folder) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


def test_retrieve_prints_its_ranking_when_the_index_cannot_be_written(tiny, collection, disk, capsys):
    index = disk.path / "photos.idx"
    assert run_cli(*search(tiny[1], collection, index)) == 0
    capsys.readouterr()
    before = index.read_bytes()
    shutil.copy(PHOTOS[0], collection / "new.jpg")  # the index must change
    disk.fill(0)
    assert run_cli(*search(tiny[1], collection, index)) == 1
    hits = json.loads(no_space_line(capsys, index))["hits"]
    assert len(hits) == 6  # the ranking, new image included
    assert index.read_bytes() == before and no_temp_files(disk.path)


@pytest.mark.parametrize("to, weights", [("native", "model.safetensors"), ("openclip", "open_clip_pytorch_model.bin")])
def test_convert_on_a_full_disk_keeps_the_earlier_export(tiny, disk, to, weights, capsys):
    out = disk.path / "weights"
    assert run_cli("convert", tiny[1], "--to", to, "--output", out) == 0
    capsys.readouterr()
    before = tree(out)
    disk.fill(64 * 1024)  # room for a config, not for weights
    assert run_cli("convert", tiny[1], "--to", to, "--output", out) == 1
    no_space_line(capsys, out / weights)
    assert tree(out) == before and no_temp_files(out)


@pytest.mark.parametrize("command", ["zeroshot", "retrieval"])
def test_eval_results_are_printed_and_the_earlier_json_kept(tiny, photo_dir, pairs, disk, command, capsys):
    out = disk.path / "results.json"
    data = {"zeroshot": disk.root.parent / "classes", "retrieval": pairs}[command]
    if command == "zeroshot":
        for name in ("cat", "cup"):
            (data / name).mkdir(parents=True)
            shutil.copy(PHOTOS[0], data / name / "a.jpg")
    args = ["eval", command, "--data", data, "--pretrained", tiny[1], "--format", "jsonl", "--output", out]
    assert run_cli(*args) == 0
    capsys.readouterr()
    before = out.read_bytes()
    disk.fill(0)
    assert run_cli(*args) == 1
    assert json.loads(no_space_line(capsys, out))["metrics"]  # the results still reached stdout
    assert out.read_bytes() == before and no_temp_files(disk.path)


def test_caption_output_on_a_full_disk_is_one_line(tiny, disk, capsys):
    earlier = disk.path / "earlier.jsonl"
    args = ["caption", PHOTOS[0], "--pretrained", tiny[1], "--seq-len", "8", "--output"]
    assert run_cli(*args, earlier) == 0
    capsys.readouterr()
    before = tree(disk.path)
    disk.fill(0)
    assert run_cli(*args, disk.path / "captions.jsonl") == 1
    no_space_line(capsys, disk.path / "captions.jsonl")
    assert earlier.read_bytes() == before["earlier.jsonl"] and no_temp_files(disk.path)


def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_export(pairs, disk, capsys):
    run = disk.path / "run"
    args = ["train", "--model", "coca_tiny", "--data", pairs, "--workers", "0", "--batch-size", "2", "--warmup", "1",
            "--log-every-n-steps", "1", "--output", run]
    assert run_cli(*args, "--epochs", "1") == 0
    capsys.readouterr()
    first = run / "checkpoints" / "step_000000002.pt"
    kept = {"checkpoints": tree(run / "checkpoints"), "final": tree(run / "final")}
    checkpoint_size, export_size = first.stat().st_size, (run / "final" / "model.safetensors").stat().st_size

    disk.fill(checkpoint_size // 2)  # the next checkpoint does not fit
    assert run_cli(*args, "--epochs", "2", "--resume", "latest") == 1
    no_space_line(capsys, run / "checkpoints" / "step_000000004.pt")
    assert tree(run / "checkpoints") == kept["checkpoints"] and tree(run / "final") == kept["final"]
    assert no_temp_files(run)

    disk.fill(checkpoint_size + export_size // 2)  # the checkpoint fits, the final export does not
    assert run_cli(*args, "--epochs", "2", "--resume", "latest") == 1
    no_space_line(capsys, run / "final" / "model.safetensors")
    assert tree(run / "final") == kept["final"] and no_temp_files(run)
    from coca_cli.train.checkpoints import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "step_000000004.pt")["step"] == 4  # the new one is whole


@pytest.mark.parametrize("command", [["caption", "--seq-len", "8"], ["classify", "--labels", "a cat,a dog"]])
def test_results_to_a_full_stdout_are_one_line(command, tiny):
    """stdout redirected to a full device (Linux's /dev/full fails every write with ENOSPC)."""
    code = "import sys; from coca_cli.cli import main; sys.exit(main(sys.argv[1:]))"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-c", code, command[0], str(PHOTOS[0]), *command[1:],
                                 "--pretrained", str(tiny[1])], stdout=full, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env())
    assert result.returncode == 1
    assert result.stderr == f"coca: error: cannot write <stdout>: {NO_SPACE}\n"
