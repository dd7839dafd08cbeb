"""GPU: a short bench/soak.py on 4 GPUs, the CUDA kernels against the reference backend with
CUDA-graph replays (the full soak of issue 13 is ``python bench/soak.py``, or ``SOAK=1
scripts/gpu_check.sh``), and its checks failing on corrupted CUDA outputs."""

from __future__ import annotations

import pytest
from conftest import gpu_pool
from helpers import bench_script, soak_worker

pytestmark = pytest.mark.gpu


def test_soak_4gpu() -> None:
    """A tenth of the full soak at its sizes (LL 256 experts, 128 tokens, hidden 7168, top-8; HT
    4096 tokens)."""
    docs = gpu_pool(4).run(soak_worker, ["--ll-iters", "1000", "--ht-iters", "200", "--quiet"])
    doc = docs[0]
    assert doc["meta"]["backend"] == "cuda" and doc["meta"]["graphs"] == "CUDA graphs"
    assert doc["passed"], bench_script("soak").render(doc)
    for mode, iters in (("ll", 1000), ("ht", 200)):
        m = doc["modes"][mode]
        assert m["iterations"] == iters and m["replays"] == iters // 10
        assert m["checks"] >= iters // 100 and m["graph_checks"] >= iters // 100


def test_soak_reports_corrupted_cuda_outputs() -> None:
    doc = gpu_pool(4).run(
        soak_worker,
        [
            *("--ll-iters", "30", "--ht-iters", "30", "--check-every", "10", "--graph-every", "4"),
            *("--self-test-corrupt", "--quiet"),
        ],
    )[0]
    assert not doc["passed"]
    for mode in ("ll", "ht"):
        m = doc["modes"][mode]
        assert m["mismatches"] >= 8, m  # dispatch and graph replay on each of the 4 ranks
        for line in m["first_mismatches"]:
            assert any(f"{mode} {where} " in line for where in ("call 0", "call 10", "graph replay 3")), line
