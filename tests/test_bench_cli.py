"""The benchmark CLI end to end at tiny sizes: standalone (spawns CPU processes) and under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# 16 tokens x top-4: LL random routing masks 10 entries, enough stay to move bytes
TINY = ["--tokens", "16", "--hidden", "256", "--experts", "8", "--topk", "4", "--iters", "3", "--warmup", "1"]


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE"):
        env.pop(var, None)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def _check_results(path: Path, modes: set[str]) -> None:
    data = json.loads(path.read_text())
    assert data["meta"]["gpu"] is False and "no GPU" in data["meta"]["note"]
    rows = data["rows"]
    assert {r["case"]["mode"] for r in rows} == modes
    assert {r["op"] for r in rows} == {"dispatch", "combine"}
    for r in rows:
        assert r["backend"] == "reference"
        assert r["median_us"] > 0 and r["p90_us"] >= r["median_us"]
        assert r["bytes"] > 0 and r["validated"] == "ok"


def test_standalone_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    proc = _run(
        [sys.executable, "-m", "ncclep.bench", *TINY, "--validate", "--plot", "--out", str(out)], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no GPU found: running the reference backend" in proc.stderr
    assert "[1/" in proc.stderr  # progress lines
    assert "median us" in proc.stdout and "reference" in proc.stdout
    _check_results(out / "results.json", {"ll", "ht"})
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torchrun_uses_its_ranks(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "results.json"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "ncclep.bench", *TINY]
    proc = _run([*cmd, "--mode", "ll", "--dtype", "fp8", "--validate", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["world_size"] == 2
    _check_results(out, {"ll"})


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "ncclep.bench", "--nprocs", "0"], tmp_path)
    assert proc.returncode == 2 and "--nprocs must be at least 1" in proc.stderr
