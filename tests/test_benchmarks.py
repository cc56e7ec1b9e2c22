"""The side-by-side benchmark runs (tiny sizes), so it never rots between GPU sessions."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_script_runs_every_task_and_checks_itself(tmp_path):
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model", "coca_tiny", "--batch", "4", "--seq-len", "8",
         "--repeats", "1", "--warmup", "1", "--steps", "2", "--loader-workers", "1", "--loader-samples", "64",
         "--json-out", str(out)],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    generate, train, loader = json.loads(out.read_text())["results"]
    assert generate["task"] == "generate" and generate["identical"] and generate["ours_per_s"] > 0
    assert train["task"] == "train" and len(train["ours_losses"]) == len(train["open_clip_losses"]) == 3
    assert train["loss_max_rel_diff"] < 1e-4 and train["speedup"] > 0
    assert loader["task"] == "loader" and loader["samples"] == 60 and loader["per_worker_per_s"] > 0  # 64 - warm-up
    assert "generate" in result.stdout and "train" in result.stdout and "loader" in result.stdout
