"""ncclep's vLLM prepare/finalize classes inside vLLM's modular MoE kernel, on 2 gloo processes.

Needs vLLM (see scripts/test_vllm.sh); skipped where ``import vllm`` fails.
"""

from __future__ import annotations

import pytest

# Not plain "vllm": with tests/ on sys.path, this very folder would import as a namespace package.
pytest.importorskip(
    "vllm.model_executor.layers.fused_moe",
    reason="vLLM is not installed: run scripts/test_vllm.sh (separate venv)",
)

import vllm_workers


def test_maybe_make_prepare_finalize_builds_ncclep(world2):
    reprs = world2.run(vllm_workers.make_prepare_finalize_worker)
    assert all("mode='ll'" in r["ll"] and "mode='ht'" in r["ht"] for r in reprs)


def test_ll_in_modular_kernel_matches_naive(world2):
    per_rank = world2.run(vllm_workers.ll_kernel_worker)
    assert len(per_rank[0]) == len(vllm_workers.CASES)


def test_ht_in_modular_kernel_matches_naive(world2):
    per_rank = world2.run(vllm_workers.ht_kernel_worker)
    assert len(per_rank[0]) == len(vllm_workers.CASES)


def test_ll_fp8_dispatch_format(world2):
    rows = [r["rows"] for r in world2.run(vllm_workers.ll_fp8_prepare_worker)]
    assert sum(rows) > 0
