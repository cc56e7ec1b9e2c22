"""The side-by-side benchmark runs (tiny sizes), so it never rots between GPU sessions."""

import json
import math
import subprocess
import sys

from conftest import ROOT


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_benchmark_script_runs_every_task_and_checks_itself(tmp_path):
    """One run of every task (open_clip is imported once: slow on a busy machine)."""
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--task", "generate,train,loader,flops",
         "--model", "coca_tiny", "--batch", "4", "--seq-len", "8", "--gen-batch", "2",
         "--repeats", "1", "--warmup", "1", "--steps", "2", "--loader-workers", "1", "--loader-samples", "64",
         "--loader-repeats", "2", "--loader-baseline", str(ROOT),
         "--json-out", str(out)],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())["results"]
    generate, train, flops = results[:3]
    loaders = results[3:]
    assert generate["task"] == "generate" and generate["identical"] and generate["ours_per_s"] > 0
    assert train["task"] == "train" and len(train["ours_losses"]) == len(train["open_clip_losses"]) == 3
    assert train["loss_max_rel_diff"] < 1e-4 and train["speedup"] > 0
    assert "generate" in result.stdout and "train" in result.stdout and "loader" in result.stdout

    # flops: issue 14's first three rows (and host syncs), both sides counted on the same step and tokens
    assert flops["task"] == "flops" and flops["model"] == "coca_tiny" and flops["identical"]
    assert flops["loss_rel_diff"] < 1e-4 and flops["decode_steps"] >= 1 and flops["gen_batch"] == 2
    for side in ("ours", "open_clip"):
        for figure in ("flops_per_sample", "saved_bytes_per_sample", "ops_per_token", "syncs_per_token"):
            assert _number(flops[f"{side}_{figure}"]), (side, figure, flops)
        assert flops[f"{side}_flops_per_sample"] > 0 and flops[f"{side}_saved_bytes_per_sample"] > 0
        assert 0 < flops[f"{side}_kernel_ops_per_token"] < flops[f"{side}_ops_per_token"]
        assert flops[f"{side}_saved_with_params_per_sample"] > flops[f"{side}_saved_bytes_per_sample"]
        assert flops[f"{side}_saved_tensors_per_sample"] >= flops[f"{side}_saved_with_params_per_sample"]
    for row in ("flops", "saved", "ops"):
        assert _number(flops[f"{row}_ratio"]) and _number(flops[f"{row}_target"])
        assert isinstance(flops[f"{row}_met"], bool)
    assert _number(flops["saved_tensors_ratio"])
    for figure in ("training GFLOPs/sample", "saved for backward MB/sample", "with the parameters it saves",
                   "per saved tensor, as the issue counts", "aten ops/token", "of which not views", "host syncs/token"):
        assert figure in result.stdout

    # loader: the --loader-baseline checkout's loader (here this one, run in a process of its own),
    # then every decode path with the worker count, the first one the baseline
    assert [r["decode"] for r in loaders] == [f"checkout {ROOT}", "previous", "new"]
    assert all(r["task"] == "loader" and r["workers"] == 1 for r in loaders)
    checkout, previous, new = loaders
    assert previous["speedup"] == 1.0
    for r in loaders:
        assert r["samples"] == 60 and _number(r["per_worker_per_s"]) and r["per_worker_per_s"] > 0  # 64 - warm-up
        assert _number(r["speedup"]) and r["target"] == 2.0
        assert len(r["runs_per_worker_per_s"]) == 2 and r["per_worker_per_s"] in r["runs_per_worker_per_s"]
    # the new path also as a GPU trainer takes it: uint8, normalised there; and over the checkout's
    assert len(new["runs_device_ready_per_worker_per_s"]) == 2
    assert new["device_ready_per_s"] in new["runs_device_ready_per_worker_per_s"]
    assert new["device_ready_speedup"] == new["device_ready_per_s"] / previous["per_worker_per_s"]
    assert new["checkout_speedup"] == new["per_worker_per_s"] / checkout["per_worker_per_s"]
    assert new["device_ready_checkout_speedup"] == new["device_ready_per_s"] / checkout["per_worker_per_s"]
    assert "over the checkout" in result.stdout


def test_saved_bytes_counts_a_buffer_once_and_the_issues_count_each_view():
    """Activations count each storage once without parameters; issue 14's count takes every
    saved tensor at its size, views of one buffer and the parameters included."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench

    layer = torch.nn.Linear(4, 3, bias=False)  # weight: 12 floats, 48 bytes
    x = torch.randn(5, 4, requires_grad=True)
    saved = bench.SavedBytes(layer)
    with saved.hooks():
        h = x.exp()  # saves h: 20 floats, 80 bytes
        loss = (h[:, :2] * h[:, 2:]).sum() + layer(h).sum()  # two 40-byte views of h; h and weight.t()
    loss.backward()
    assert saved.bytes == 80 and saved.param_bytes == 48
    assert saved.tensor_bytes == 80 + 40 + 40 + 48


def test_retrieve_benchmark_compares_exact_search_and_every_faiss_index(tmp_path):
    out = tmp_path / "retrieve.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--task", "retrieve", "--sizes", "500,2100",
         "--dim", "32", "--queries", "7", "--repeats", "1", "--json-out", str(out)],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["size"], r["method"]) for r in rows] == [(size, method) for size in (500, 2100)
                                                        for method in ("naive", "exact", "flat", "ivf", "hnsw")]
    for r in rows:
        assert r["task"] == "retrieve" and r["queries"] == 7 and r["k"] == 10 and r["ok"]
        assert _number(r["batch_s"]) and _number(r["single_s"]) and r["batch_s"] > 0
        if r["method"] == "exact":
            assert r["recall_vs_naive"] == 1.0  # no near ties among so few
        if r["method"] in ("flat", "ivf", "hnsw"):
            assert _number(r["build_s"]) and 0 < r["recall_at_k"] <= 1
        if r["method"] == "flat":
            assert r["recall_at_k"] == 1.0  # exhaustive: faiss finds what exact search finds
    assert "recall@10" in result.stdout and "naive matmul+topk" in result.stdout
