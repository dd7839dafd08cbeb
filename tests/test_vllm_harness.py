"""The vLLM harness (tests/vllm_harness) on CPU: ncclep's LL and HT prepare/finalize classes, the
reference backend on 2 gloo processes, through vLLM's calls, against a dense MoE.

Without vLLM (this suite's environment) vLLM's names are stand-ins; with it
(``/tmp/vllm-venv/bin/python -m pytest tests/test_vllm_harness.py``) the real ones run, the cases
that need vLLM's CUDA ops are skipped, and the stand-ins are compared with vLLM's own functions.
The GPU run of the same driver is tests/gpu/test_vllm_harness_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from vllm_harness import driver, stand_ins


def test_prepare_finalize_through_vllm_calls_match_dense_moe(world2):
    driver.assert_passed(world2.run(driver.run_rank, "reference"), "reference")


def test_importing_the_harness_installs_nothing():
    """Only a driver run installs stand-ins (in the worker processes), never an import: this
    process must still see whether vLLM is really there (tests/vllm skip on it)."""
    assert not stand_ins.using_stand_ins()


def test_stand_ins_match_vllm():
    """Where vLLM is installed: the stand-ins give what vLLM's functions give, on CPU (vLLM's fp8
    group quantisation runs there only as its native QuantFP8 path, the one compared here)."""
    if not stand_ins.real_vllm_installed():
        pytest.skip("needs vLLM: /tmp/vllm-venv/bin/python -m pytest tests/test_vllm_harness.py")
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import utils
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 512, generator=g) * torch.rand(37, 1, generator=g) * 5).to(torch.bfloat16)
    with set_current_vllm_config(VllmConfig()):
        q, s = QuantFP8(static=False, group_shape=GroupShape(1, 128), use_ue8m0=False).forward_native(x)
    fp8 = stand_ins.FP8_DTYPE
    sq, ss = stand_ins.moe_kernel_quantize_input(x, None, fp8, False, [128, 128])
    assert torch.equal(q.view(torch.uint8), sq.view(torch.uint8)) and torch.equal(s, ss)
    assert stand_ins.moe_kernel_quantize_input(x, None, None, False, None)[0] is x
    assert utils.moe_kernel_quantize_input(x, None, None, False, None)[0] is x
    for scales in (None, torch.tensor([2.0]), torch.randn(24, 3, generator=g)):
        ours = stand_ins.normalize_batched_scales_shape(scales, 4)
        theirs = utils.normalize_batched_scales_shape(scales, 4)
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)
    ours_meta = stand_ins.ExpertTokensMetadata.make_from_list([3, 0, 5], device="cpu")
    theirs_meta = mk.ExpertTokensMetadata.make_from_list([3, 0, 5], device="cpu")
    assert torch.equal(ours_meta.expert_num_tokens, theirs_meta.expert_num_tokens)
    assert ours_meta.expert_num_tokens.dtype == theirs_meta.expert_num_tokens.dtype == torch.int32
    for kwargs in ({}, {"quant_dtype": fp8, "block_shape": [128, 128]}):
        ours_cfg, theirs_cfg = (
            stand_ins.FusedMoEQuantConfig.make(**kwargs),
            FusedMoEQuantConfig.make(**kwargs),
        )
        for name in ("quant_dtype", "per_act_token_quant", "block_shape", "a1_scale", "is_block_quantized"):
            assert getattr(ours_cfg, name) == getattr(theirs_cfg, name), name
    assert (
        stand_ins.FusedMoEPrepareAndFinalizeModular.__abstractmethods__
        == mk.FusedMoEPrepareAndFinalizeModular.__abstractmethods__
    )
    assert [f.value for f in stand_ins.FusedMoEActivationFormat] == [
        f.value for f in mk.FusedMoEActivationFormat
    ]
