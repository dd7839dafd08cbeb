"""The MoE layer (ncclep.moe) and its example (examples/moe_layer.py).

In process (world 3, one rank with no tokens, padding rows poisoned with NaN): the distributed
layer's outputs and gradients equal a dense one-process layer over every rank's tokens at once.
End to end on CPU (subprocesses, tiny sizes): decode and train ``--check``, fp8, torch.compile,
``--bench``, and a run under torchrun.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, TORCHRUN, run_cpu_process

import ncclep
from ncclep import testing
from ncclep.moe import DenseMoE, EPMoE, route

EXAMPLE = ROOT / "examples" / "moe_layer.py"
TINY = ["--tokens", "8", "--hidden", "128", "--experts", "8", "--topk", "2", "--ffn", "64"]
PASS = re.compile(r"check: max relative error (\S+) \(tolerance \S+\): PASS")


# ------------------------------------------------------------------------------------ in process


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _poison_padding(group: ncclep.Group) -> None:
    """Make the group's dispatches fill padding rows with NaN (the ops leave them unspecified)."""
    ll, ht = group.ll_dispatch, group.ht_dispatch

    def ll_dispatch(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = ll(*args, **kwargs)
        rows = torch.arange(out.x.shape[1]).unsqueeze(0)
        pad = (rows >= out.expert_counts.unsqueeze(1)).unsqueeze(-1)
        if out.scales is not None:  # fp8 payload: poison through the scales
            return out._replace(scales=torch.where(pad, float("nan"), out.scales))
        return out._replace(x=torch.where(pad, float("nan"), out.x))

    def ht_dispatch(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = ht(*args, **kwargs)
        pad = (out.handle.recv_slot < 0).unsqueeze(1)
        return out._replace(x=torch.where(pad, float("nan"), out.x))

    group.ll_dispatch = ll_dispatch  # type: ignore[method-assign]
    group.ht_dispatch = ht_dispatch  # type: ignore[method-assign]


def _layer_matches_dense(mode: str, use_fp8: bool) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, experts, topk, tokens = 128, 2 * world, 3, (6, 0, 5)[rank]
    errors: dict[str, float] = {}
    with ncclep.Group(experts, 8, hidden, mode=mode, max_topk=topk) as group:
        _poison_padding(group)
        layer = EPMoE(group, 64, topk, use_fp8=use_fp8, alignment=4, seed=3)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).requires_grad_(mode == "ht")
        gout = torch.randn(tokens, hidden, generator=g)
        if mode == "ll":
            with torch.no_grad():
                y = layer(x)
        else:
            y = layer(x)
            (y.float() * gout).sum().backward()
            layer.sync_router_grads()
        assert torch.isfinite(y).all()

        # dense: one forward over every rank's tokens; a token's rows are its own
        dense = DenseMoE.from_ep(layer)
        xs = [t.to(torch.bfloat16) for t in testing.gather_tensor(None, x.detach())]  # type: ignore[union-attr]
        gs = testing.gather_tensor(None, gout)
        start = sum(t.shape[0] for t in xs[:rank])
        xd = torch.cat(xs).requires_grad_(mode == "ht")
        yd = dense(xd)
        if tokens:
            errors["output"] = _rel(y, yd[start : start + tokens])
        if mode == "ht":
            (yd.float() * torch.cat(gs)).sum().backward()  # type: ignore[arg-type]
            if tokens:
                errors["grad x"] = _rel(x.grad, xd.grad[start : start + tokens])  # type: ignore[arg-type, index]
            errors["grad router"] = _rel(layer.router.weight.grad, dense.router.weight.grad)  # type: ignore[arg-type]
            first, local = layer.first_expert, group.num_local_experts
            want = dict(dense.experts.named_parameters())
            for name, p in layer.experts.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                errors[f"grad {name}"] = _rel(p.grad, want[name].grad[first : first + local])  # type: ignore[index]
    return errors


@pytest.mark.parametrize(("mode", "use_fp8"), [("ht", False), ("ll", False), ("ll", True)])
def test_layer_matches_dense_world3_with_an_empty_rank(world3, mode: str, use_fp8: bool) -> None:  # type: ignore[no-untyped-def]
    results = world3.run(_layer_matches_dense, mode, use_fp8)
    assert "output" not in results[1]  # rank 1 had no tokens
    for rank, errors in enumerate(results):
        assert errors if rank != 1 or mode == "ht" else True
        assert all(err < 2e-2 for err in errors.values()), (rank, errors)
    if mode == "ht":
        assert {"grad router", "grad w1", "grad w2", "grad w3"} <= set(results[1])


def test_router_weights_are_renormalised_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 16, generator=g).to(torch.bfloat16), torch.randn(6, 16, generator=g)
    idx, weights = route(x, w, 2)
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(idx, (x.float() @ w.t()).topk(2, dim=1).indices)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(5))


# ------------------------------------------------------------------------------------ the example


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    proc = run_cpu_process(cmd, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _passed(out: str, checks: int = 1) -> None:
    found = PASS.findall(out)
    assert len(found) == checks, out
    assert all(float(err) < 2e-2 for err in found), out


def test_decode_check_fp8_compiled(tmp_path: Path) -> None:
    out = _run(
        [sys.executable, str(EXAMPLE), "--mode", "decode", *TINY, "--fp8", "--compile", "--check"], tmp_path
    ).stdout
    assert "running the reference backend on 2 CPU processes" in out
    assert "fp8" in out and "torch.compile (aot_eager): max |compiled - eager| 0.000e+00" in out
    _passed(out)


def test_train_check_steps_and_bench(tmp_path: Path) -> None:
    args = [*TINY, "--check", "--steps", "2", "--bench", "--iters", "2", "--warmup", "0"]
    out = _run([sys.executable, str(EXAMPLE), "--mode", "train", *args], tmp_path).stdout
    _passed(out)
    for name in ("output", "grad input", "grad router", "grad w1", "grad w2", "grad w3"):
        assert re.search(rf"^\s+{name}\s+relative error", out, re.M), (name, out)
    losses = [float(v) for v in re.findall(r"^step \d+: loss (\S+)$", out, re.M)]
    assert len(losses) == 2 and losses[1] < losses[0], out
    assert "bench train layer forward+backward" in out and len(_timings(out)) == 1


def _timings(out: str) -> list[tuple[str, float]]:
    """The --bench lines. On CPU the group runs the reference backend: timed once, as reference."""
    found = re.findall(r"^\s+(ncclep \(\w+\)(?: graph)?|reference)\s+([\d.]+) us$", out, re.M)
    assert [name for name, _ in found] == ["reference"], out
    assert "the group runs the reference backend, so it is timed once" in out
    assert all(float(us) > 0 for _, us in found), out
    return [(name, float(us)) for name, us in found]


def test_torchrun_decode_check_bench_and_graph_skip(tmp_path: Path) -> None:
    cmd = [*TORCHRUN, str(EXAMPLE), "--mode", "decode", *TINY]
    out = _run([*cmd, "--check", "--bench", "--graph", "--iters", "3", "--warmup", "1"], tmp_path).stdout
    assert "decode: 2 ranks" in out and "bf16" in out
    _passed(out)
    assert "--graph: needs a GPU, skipped" in out
    assert "bench decode layer forward" in out and len(_timings(out)) == 1


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    proc = run_cpu_process([sys.executable, str(EXAMPLE), "--mode", "train", "--fp8"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "for --mode decode" in proc.stderr
