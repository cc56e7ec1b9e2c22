"""`coca retrieve` for large collections: chunked exact search, and faiss indexes kept beside the image index."""

import json
import shutil
import sys

import pytest
import torch

from conftest import one_error_line, run_cli

from coca_cli.tasks.retrieval import top_k


def unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def exact_ranking(queries, candidates):
    """The unchunked definition: every score in float64, rounded to float32, sorted whole, ties by index."""
    return (queries.double() @ candidates.double().T).float().sort(dim=1, descending=True, stable=True)


@pytest.fixture(scope="module")
def with_ties():
    """1000 candidates of which several are copies of one (equal scores); the first query is that one."""
    queries, candidates = unit_rows(9, 48, seed=0), unit_rows(1000, 48, seed=1)
    candidates[[10, 11, 500, 900, 999]] = candidates[3].clone()
    queries[0] = candidates[3]
    return queries, candidates


@pytest.mark.parametrize("chunk, fast_dtype", [(1, torch.float32), (7, torch.float32), (333, torch.float32),
                                               (1000, torch.float32), (4096, torch.float32),
                                               (64, torch.float16), (333, torch.float16)])  # fp16: as on CUDA
@pytest.mark.parametrize("k", [1, 6, 100, 2000])  # 2000: more than the collection, and than most chunks
def test_chunked_search_is_exact_whatever_the_chunk(with_ties, chunk, k, fast_dtype):
    queries, candidates = with_ties
    scores, indices = top_k(queries, candidates, k, chunk=chunk, fast_dtype=fast_dtype)
    expected = exact_ranking(queries, candidates)
    assert torch.equal(indices, expected.indices[:, :k]) and torch.equal(scores, expected.values[:, :k])
    assert indices[0, :6].tolist() == [3, 10, 11, 500, 900, 999][:k]  # equal scores: the earlier candidate first


def test_without_ties_it_is_torch_topk_of_the_unchunked_matmul():
    queries, candidates = unit_rows(20, 64, seed=2), unit_rows(3000, 64, seed=3)
    full = (queries @ candidates.T).topk(25, dim=1)
    scores, indices = top_k(queries, candidates, 25, chunk=257)
    assert torch.equal(indices, full.indices)
    torch.testing.assert_close(scores, full.values, rtol=0, atol=1e-6)


def test_near_ties_within_the_fp16_error_are_settled_in_fp32():
    """Candidates 1e-4 apart (far below fp16's resolution): the fast matmul cannot order them, the answer is exact."""
    query = unit_rows(1, 32, seed=4)
    near = torch.nn.functional.normalize(query + 1e-3 * unit_rows(300, 32, seed=5), dim=1)
    candidates = torch.cat([unit_rows(700, 32, seed=6), near])
    scores, indices = top_k(query, candidates, 5, chunk=100, fast_dtype=torch.float16)
    expected = exact_ranking(query, candidates)
    assert torch.equal(indices, expected.indices[:, :5]) and torch.equal(scores, expected.values[:, :5])


# -- faiss indexes through the command -----------------------------------------------------------

@pytest.fixture
def collection(photo_dir, tmp_path):
    folder = tmp_path / "collection"
    shutil.copytree(photo_dir, folder)
    return folder


def retrieve(native, collection, *extra, query="a rocket on the launch pad"):
    """(hits as (image, score) pairs, stderr) of one `coca retrieve --json` over the collection."""
    return ["retrieve", "--images", collection, "--query", query, "--top-k", "10", "--json", "--pretrained", native,
            *extra]


def hits_and_err(capsys):
    captured = capsys.readouterr()
    return [(hit["image"], hit["score"]) for hit in json.loads(captured.out)["hits"]], captured.err


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_faiss_index_gives_the_exact_hits_and_is_reused_until_the_collection_changes(tiny, collection, index_type,
                                                                                     capsys):
    native = tiny[1]
    assert run_cli(*retrieve(native, collection)) == 0
    exact, _ = hits_and_err(capsys)
    assert len(exact) == 5

    assert run_cli(*retrieve(native, collection, "--index-type", index_type)) == 0
    hits, err = hits_and_err(capsys)
    saved = collection / f".coca-index.pt.{index_type}.faiss"
    assert f"built the {index_type} index of 5 images (saved as {saved})" in err
    assert hits == exact  # five images: every type finds them all (ivf: one list), rescored exactly
    first = saved.stat()

    assert run_cli(*retrieve(native, collection, "--index-type", index_type)) == 0
    hits, err = hits_and_err(capsys)
    assert f"reused the {index_type} index {saved}" in err and "built" not in err and hits == exact
    assert (saved.stat().st_ino, saved.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    shutil.copy(collection / "rocket.png", collection / "rocket2.png")  # the collection changed
    assert run_cli(*retrieve(native, collection, "--index-type", index_type)) == 0
    hits, err = hits_and_err(capsys)
    assert f"built the {index_type} index of 6 images" in err and saved.stat().st_ino != first.st_ino
    assert dict(hits)[str(collection / "rocket2.png")] == pytest.approx(dict(hits)[str(collection / "rocket.png")])


def test_ivf_takes_nprobe_and_files_without_an_index_are_not_kept(tiny, photo_dir, tmp_path, capsys):
    photos = sorted(photo_dir.iterdir())[:3]
    args = ["retrieve", *(a for p in photos for a in ("--images", p)), "--query", "a cat", "--json",
            "--pretrained", tiny[1], "--index-type", "ivf", "--nprobe", "1"]
    assert run_cli(*args) == 0
    hits, err = hits_and_err(capsys)
    assert len(hits) == 3 and "built the ivf index of 3 images (not kept: pass --index FILE to keep it)" in err
    assert not list(photo_dir.glob("*.faiss"))
    assert run_cli(*args, "--index", tmp_path / "photos.idx") == 0
    assert hits_and_err(capsys)[0] == hits and (tmp_path / "photos.idx.ivf.faiss").is_file()


def test_a_damaged_faiss_index_is_rebuilt_with_a_warning(tiny, collection, capsys):
    native = tiny[1]
    assert run_cli(*retrieve(native, collection, "--index-type", "hnsw")) == 0
    hits, _ = hits_and_err(capsys)
    saved = collection / ".coca-index.pt.hnsw.faiss"
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside faiss's part
    saved.write_bytes(data)
    assert run_cli(*retrieve(native, collection, "--index-type", "hnsw")) == 0
    again, err = hits_and_err(capsys)
    assert f"warning: rebuilding the faiss index {saved}: checksum mismatch" in err and "Traceback" not in err
    assert again == hits and "built the hnsw index" in err

    saved.write_bytes(saved.read_bytes()[:100])  # cut short
    assert run_cli(*retrieve(native, collection, "--index-type", "hnsw")) == 0
    assert "warning: rebuilding the faiss index" in hits_and_err(capsys)[1]
    assert run_cli(*retrieve(native, collection, "--index-type", "hnsw")) == 0
    assert "reused the hnsw index" in hits_and_err(capsys)[1]


def test_without_faiss_it_says_how_to_install_it_before_loading_a_model(collection, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    # the model does not exist: an error about it would mean it was loaded first
    assert run_cli(*retrieve(tmp_path / "no-such-model", collection, "--index-type", "ivf")) == 2
    assert "--index-type ivf needs faiss: pip install 'coca-cli[faiss]'" in one_error_line(capsys)
    assert not list(collection.glob(".coca-index*"))


def test_a_faiss_index_that_cannot_be_written_is_a_warning_and_the_search_goes_on(tiny, collection, capsys):
    assert run_cli(*retrieve(tiny[1], collection)) == 0
    exact, _ = hits_and_err(capsys)
    (collection / ".coca-index.pt.flat.faiss").mkdir()  # in the way: the file cannot replace it
    assert run_cli(*retrieve(tiny[1], collection, "--index-type", "flat")) == 0
    hits, err = hits_and_err(capsys)
    assert hits == exact and "warning: the flat index is not kept: " in err and "(not kept)" in err


@pytest.mark.parametrize("args, message", [
    (["--images", "x", "--query", "a", "--index-type", "flat", "--nprobe", "4"], "--nprobe belongs to --index-type"),
    (["--images", "x", "--query", "a", "--nprobe", "4"], "--nprobe belongs to --index-type ivf"),
    (["--texts", "t.txt", "--image", "y", "--index-type", "hnsw"], "--index-type belongs to an --images collection"),
])
def test_misplaced_options_are_one_line(tiny, args, message, capsys):
    assert run_cli("retrieve", *args, "--pretrained", tiny[1]) == 2
    assert message in one_error_line(capsys)
