"""GPU: ncclep's vLLM prepare/finalize classes on the CUDA backend, through the calls vLLM makes
(tests/vllm_harness), on 2 and 4 GPUs: every LL/HT case of the CPU test, plus LL forwards captured
in a CUDA graph (bf16 and fp8) and replayed on fresh inputs, all against a dense MoE.

The GPU hosts have no vLLM: its names are stand-ins that make the same calls (the driver logs so).
"""

from __future__ import annotations

import pytest
from conftest import gpu_pool
from vllm_harness import driver

pytestmark = pytest.mark.gpu

SIZES = driver.Sizes(experts=32, hidden=2048, ffn=256, ll_max_tokens=64, ht_max_tokens=256)
GRAPH_REPLAYS = 20


@pytest.mark.parametrize("world", [2, 4, 8])
def test_vllm_prepare_finalize_on_cuda(world: int) -> None:
    per_rank = gpu_pool(world).run(driver.run_rank, "cuda", SIZES, GRAPH_REPLAYS)
    driver.assert_passed(per_rank, "cuda", graphs=True)
