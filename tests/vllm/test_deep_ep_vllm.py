"""vLLM's own DeepEP prepare/finalize classes (``DeepEPLLPrepareAndFinalize``,
``DeepEPHTPrepareAndFinalize``) over ncclep.deep_ep through the ``deep_ep`` alias, with no
patching, inside vLLM's modular MoE kernel, on 2 gloo processes.

Needs vLLM (see scripts/test_vllm.sh); skipped where ``import vllm`` fails.
"""

from __future__ import annotations

import pytest

# Not plain "vllm": with tests/ on sys.path, this very folder would import as a namespace package.
pytest.importorskip(
    "vllm.model_executor.layers.fused_moe",
    reason="vLLM is not installed: run scripts/test_vllm.sh (separate venv)",
)

import deep_ep_vllm_workers
import vllm_workers


def test_vllm_deepep_ll_classes_over_the_shim(world2):
    per_rank = world2.run(deep_ep_vllm_workers.ll_kernel_worker)
    assert len(per_rank[0]) == len(vllm_workers.CASES)


def test_vllm_deepep_ll_fp8_prepare_over_the_shim(world2):
    rows = [r["rows"] for r in world2.run(deep_ep_vllm_workers.ll_fp8_prepare_worker)]
    assert sum(rows) > 0


def test_vllm_deepep_ht_classes_over_the_shim(world2):
    per_rank = world2.run(deep_ep_vllm_workers.ht_kernel_worker)
    assert len(per_rank[0]) == len(vllm_workers.CASES)
