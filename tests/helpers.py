"""Shared pieces of the CPU suite: inputs, routings and bit-exact comparisons.

Everything here runs inside the DistPool workers (see dist_pool.py); nothing here talks to a
backend except through the public Group API.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from ncclep import fp8
from ncclep.workloads import make_routing


def rank_and_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def generator(*salt: int) -> torch.Generator:
    """A generator seeded by the rank and the caller's salt: every rank and call gets its own data."""
    seed = dist.get_rank() * 1_000_003
    for s in salt:
        seed = seed * 7919 + s
    return torch.Generator().manual_seed(seed % (2**63))


def random_x(tokens: int, hidden: int, g: torch.Generator) -> torch.Tensor:
    """bf16 activations with varied magnitudes per row and no zeros."""
    scale = torch.rand(tokens, 1, generator=g) * 4 + 0.25
    x = torch.randn(tokens, hidden, generator=g) * scale
    x = torch.where(x == 0, 0.5, x)
    return x.to(torch.bfloat16)


def routing(
    kind: str,
    tokens: int,
    num_experts: int,
    topk: int,
    g: torch.Generator,
    *,
    masked: int = 0,
    hot_rank: int = 0,
    int32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    idx, w = make_routing(
        kind,
        tokens,
        num_experts,
        topk,
        world_size=dist.get_world_size(),
        generator=g,
        masked=masked,
        hot_rank=hot_rank,
    )
    return (idx.to(torch.int32) if int32 else idx), w


def routing_for_call(
    call: dict[str, Any], tokens: int, num_experts: int, g: torch.Generator, row_stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing a test case dict asks for, then ``masked_rows`` whole tokens set to -1 (their
    weights stay nonzero and must be ignored), picked every ``row_stride`` tokens."""
    idx, w = routing(
        call["routing"],
        tokens,
        num_experts,
        call["topk"],
        g,
        masked=call.get("masked", 0),
        hot_rank=call.get("hot_rank", 0),
        int32=call.get("int32", False),
    )
    for b in range(min(call.get("masked_rows", 0), tokens)):
        idx[(b * row_stride) % tokens] = -1
    return idx, w


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so NaNs, -0.0 and fp8 compare bit for bit). Copied into row-major
    strides first: ``contiguous()`` keeps a view whose last dimension has size 1 and stride > 1
    (a column of column-major scales), which ``view`` cannot reinterpret."""
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t).view(torch.uint8)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(bits(actual), bits(expected)):
        diff = (bits(actual) != bits(expected)).reshape(actual.shape[0], -1).any(dim=1).nonzero()
        raise AssertionError(f"{what}: rows {diff.flatten().tolist()[:10]} differ")


def owner(expert: int, num_local_experts: int) -> int:
    return expert // num_local_experts


def expected_send_slots(topk_idx: torch.Tensor, num_local_experts: int, world: int) -> torch.Tensor:
    """[B, R]: index of token b among this rank's tokens going to rank d, -1 if it does not go there."""
    slots = torch.full((topk_idx.shape[0], world), -1, dtype=torch.int32)
    next_slot = [0] * world
    for b in range(topk_idx.shape[0]):
        dests = {owner(int(e), num_local_experts) for e in topk_idx[b].tolist() if e >= 0}
        for d in sorted(dests):
            slots[b, d] = next_slot[d]
            next_slot[d] += 1
    return slots


def tokens_to(topk_idx: torch.Tensor, rank: int, num_local_experts: int) -> list[int]:
    """Token indices (ascending) of ``topk_idx`` that have an expert on ``rank``."""
    return [
        b
        for b in range(topk_idx.shape[0])
        if any(e >= 0 and owner(e, num_local_experts) == rank for e in topk_idx[b].tolist())
    ]


def gather_objects(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def step(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` here; if it raised on any rank, raise on every rank.

    Keeps a failure on one rank from leaving its peers blocked in their next collective until the
    gloo timeout: every rank meets in one all-gather of the outcome before going on.
    """
    error = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except Exception:
        error = traceback.format_exc()
    errors = gather_objects(error)
    failed = [r for r, e in enumerate(errors) if e is not None]
    if failed:
        name = getattr(fn, "__name__", repr(fn))
        raise AssertionError(error or f"{name} failed on rank(s) {failed}; this rank was fine")
    return result


def expert_factor(global_expert: int, num_experts: int) -> torch.Tensor:
    """The per-expert multiplier of the synthetic experts, as an fp32 scalar tensor."""
    return torch.tensor((global_expert + 1) / num_experts, dtype=torch.float32)


def dequantized_row(x_row: torch.Tensor, use_fp8: bool, ue8m0: bool) -> torch.Tensor:
    """fp32 value an expert sees for the bf16 token ``x_row`` [H] after an (fp8) dispatch."""
    if not use_fp8:
        return x_row.float()
    q, s = fp8.quantize(x_row.unsqueeze(0), ue8m0)
    return fp8.dequantize(q, s)[0]


def combine_tolerance(ref_abs: torch.Tensor) -> torch.Tensor:
    """Elementwise bound for a bf16 combine of an fp32 sum whose terms have absolute sum ``ref_abs``.

    A few bf16 roundings of partial and final sums (unit roundoff 2**-9 each) stay below 2**-6 of
    the sum of absolute terms; the tiny absolute part covers exact zeros.
    """
    return ref_abs * 2.0**-6 + 1e-30


def check_close(out: torch.Tensor, ref: torch.Tensor, ref_abs: torch.Tensor, what: str) -> None:
    out32 = out.float()
    assert torch.isfinite(out32).all(), f"{what}: non-finite values in the result"
    err = (out32 - ref).abs()
    bound = combine_tolerance(ref_abs)
    if not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        raise AssertionError(
            f"{what}: |out-ref| {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
            f"at flat index {worst}"
        )
    denom = float(ref.norm())
    if denom > 0:
        rel = float((out32 - ref).norm()) / denom
        assert rel < 1e-2, f"{what}: relative error {rel:.3g}"


def bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` (a script, not a package module) imported as ``bench_<name>``, once."""
    module_name = f"bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before running it: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def soak_worker(argv: list[str]) -> dict[str, Any]:
    """``bench/soak.py`` with these arguments on this pool's ranks: its summary (every rank's)."""
    soak = bench_script("soak")
    args = soak.parse_args(argv)
    on_gpu = "nccl" in str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return soak.soak(args, dist.group.WORLD, device)
