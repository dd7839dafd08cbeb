"""An expert-parallel MoE layer on ncclep: decode (LL) or training (HT), checked against the same
layer computed densely on one process, and timed against the reference backend.

    python examples/moe_layer.py --mode decode --check            # spawns one process per GPU
    python examples/moe_layer.py --mode train --steps 10 --check   # (no GPU: --nprocs CPU processes)
    torchrun --nproc-per-node 4 examples/moe_layer.py --mode decode --fp8 --graph --bench
    mpirun -np 4 python examples/moe_layer.py --mode train --bench

``--check`` compares the distributed layer with :class:`ncclep.moe.DenseMoE` built from the same
parameters: outputs in decode; outputs and the gradients of the input, the router and every expert
in train (after one backward). Each rank evaluates the dense layer on its own tokens (a token's
output depends on that token only), then the errors and the dense expert gradients are summed
over ranks. It prints the relative errors (``‖got - want‖ / ‖want‖``) and PASS or FAIL, and exits
non-zero on FAIL.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

try:
    import ncclep
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ncclep
from ncclep.bench.timing import capture_graph, slowest, time_steps
from ncclep.launch import launch
from ncclep.moe import DenseMoE, EPMoE

CPU_NOTICE = "no GPU found: running the reference backend on {n} CPU processes (gloo)"
TOLERANCE = {"bf16": 2e-2, "fp8": 6e-2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="examples/moe_layer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("decode", "train"), default="decode")
    p.add_argument("--tokens", type=int, help="tokens per rank (default: 128 decode, 4096 train; CPU 16/64)")
    p.add_argument("--hidden", type=int, help="hidden size (default 2048; CPU 256)")
    p.add_argument("--experts", type=int, help="experts in all (default 8 per rank)")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--ffn", type=int, help="expert intermediate size (default 1024; CPU 256)")
    p.add_argument("--activation", choices=("swiglu", "gelu"), default="swiglu")
    p.add_argument("--alignment", type=int, default=8, help="train: expert segment alignment (rows)")
    p.add_argument("--steps", type=int, default=5, help="train: optimizer steps")
    p.add_argument("--optim", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fp8", action="store_true", help="decode: dispatch in fp8 (e4m3, per-128 scales)")
    p.add_argument("--check", action="store_true", help="compare with the dense one-process layer")
    p.add_argument("--bench", action="store_true", help="time the layer, group backend and reference")
    p.add_argument("--iters", type=int, help="--bench: timed calls (default 50 on GPU, 10 on CPU)")
    p.add_argument("--warmup", type=int, help="--bench: untimed calls first (default 10 on GPU, 2 on CPU)")
    p.add_argument("--graph", action="store_true", help="decode: capture the layer in a CUDA graph (GPU)")
    p.add_argument("--compile", action="store_true", help="decode: run the layer under torch.compile")
    p.add_argument(
        "--compile-backend", help="torch.compile backend (default: inductor on GPU, aot_eager on CPU)"
    )
    p.add_argument("--backend", choices=("auto", "reference", "cuda"), default="auto")
    p.add_argument("--nprocs", type=int, help="processes when started by itself (default: GPUs, or 2 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.nprocs is not None and args.nprocs < 1:
        p.error("--nprocs must be at least 1")
    if args.mode == "train" and (args.fp8 or args.graph or args.compile):
        p.error("--fp8, --graph and --compile are for --mode decode")
    for name in ("tokens", "hidden", "experts", "ffn", "topk", "steps", "alignment", "iters"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("tokens", "steps") else 1):
            p.error(f"--{name} must be positive")
    return args


def _fill_defaults(args: argparse.Namespace, world: int, gpu: bool) -> None:
    decode = args.mode == "decode"
    if args.tokens is None:
        args.tokens = (128 if decode else 4096) if gpu else (16 if decode else 64)
    args.hidden = args.hidden or (2048 if gpu else 256)
    args.ffn = args.ffn or (1024 if gpu else 256)
    args.experts = args.experts or 8 * world
    args.iters = args.iters or (50 if gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)


class Ranked:
    """Rank-aware printing and reductions over the layer's process group."""

    def __init__(self, pg: dist.ProcessGroup | None, device: torch.device) -> None:
        self.pg, self.device = pg, device
        self.rank, self.world = dist.get_rank(pg), dist.get_world_size(pg)

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.pg)
        return t.tolist()


def _rel_errors(ranked: Ranked, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """``‖got - want‖ / ‖want‖`` of each pair, with both norms summed over the ranks."""
    sq: list[float] = []
    for got, want in pairs.values():
        got, want = got.detach().double(), want.detach().double()
        sq += [float((got - want).square().sum()), float(want.square().sum())]
    total = ranked.sum(sq)
    return {name: (total[2 * i] ** 0.5) / max(total[2 * i + 1] ** 0.5, 1e-30) for i, name in enumerate(pairs)}


def _verdict(ranked: Ranked, errors: dict[str, float], tolerance: float) -> bool:
    for name, err in errors.items():
        ranked.say(f"  {name:<12} relative error {err:.3e}")
    worst = max(errors.values())
    ok = worst <= tolerance
    ranked.say(f"check: max relative error {worst:.3e} (tolerance {tolerance:g}): {'PASS' if ok else 'FAIL'}")
    return ok


def _inputs(args: argparse.Namespace, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + 17 * rank + 1)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(torch.bfloat16)
    target = torch.randn(args.tokens, args.hidden, generator=g)
    return x.to(device), target.to(device)


def _bench(
    ranked: Ranked, args: argparse.Namespace, runs: dict[str, Callable[[], Any]], what: str
) -> dict[str, float]:
    """Median per call (slowest rank) of each run, barrier before every call."""
    medians: dict[str, float] = {}
    for name, fn in runs.items():

        def step(_i: int, mark: Callable[[], None], fn: Callable[[], Any] = fn) -> None:
            mark()
            fn()
            mark()

        timing = time_steps(
            step, 1, warmup=args.warmup, iters=args.iters, device=ranked.device, group=ranked.pg
        )[0]
        worst = slowest(timing, ranked.pg)
        assert worst is not None
        medians[name] = worst.median_us
    clock = "CUDA events" if ranked.device.type == "cuda" else "perf_counter"
    ranked.say(f"bench {what}: median of {args.iters} calls ({clock}, barrier between calls, slowest rank)")
    for name, us in medians.items():
        ranked.say(f"  {name:<28} {us:12.1f} us")
    return medians


def _run_name(group: ncclep.Group) -> str:
    """The name a timing of ``group`` is printed under: ``reference`` for the reference backend."""
    return "reference" if group.backend == "reference" else f"ncclep ({group.backend})"


def _reference_twin(
    group: ncclep.Group, sizes: tuple[int, int, int], mode: str, ranked: Ranked, args: argparse.Namespace
) -> ncclep.Group | None:
    """A reference-backend group of the same sizes to time beside ``group``; None when ``group``
    already runs the reference backend (it is timed once, as ``reference``)."""
    if group.backend == "reference":
        ranked.say("bench: the group runs the reference backend, so it is timed once (as reference)")
        return None
    return ncclep.Group(*sizes, mode=mode, process_group=ranked.pg, max_topk=args.topk, backend="reference")


# ------------------------------------------------------------------------------------------- decode


def run_decode(args: argparse.Namespace, ranked: Ranked) -> bool:
    device = ranked.device
    gpu = device.type == "cuda"
    sizes = (args.experts, args.tokens, args.hidden)
    group = ncclep.Group(*sizes, mode="ll", process_group=ranked.pg, max_topk=args.topk, backend=args.backend)
    layer = EPMoE(
        group, args.ffn, args.topk, activation=args.activation, use_fp8=args.fp8, seed=args.seed
    ).eval()
    x, _ = _inputs(args, ranked.rank, device)
    dtype = "fp8" if args.fp8 else "bf16"
    ranked.say(
        f"decode: {ranked.world} ranks, {args.tokens} tokens/rank, hidden {args.hidden}, "
        f"{args.experts} experts (top-{args.topk}), ffn {args.ffn}, {dtype}, backend {group.backend}"
    )
    ok = True
    compile_backend = args.compile_backend or ("inductor" if gpu else "aot_eager")

    def runner(lay: EPMoE) -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.compile(lay, backend=compile_backend, fullgraph=True) if args.compile else lay

    forward = runner(layer)
    graph: torch.cuda.CUDAGraph | None = None
    with torch.no_grad():
        y = forward(x)
        if args.compile:
            diff = float((y.float() - layer(x).float()).abs().max()) if y.numel() else 0.0
            ranked.say(f"torch.compile ({compile_backend}): max |compiled - eager| {diff:.3e}")
        if args.graph:
            if not gpu:
                ranked.say("--graph: needs a GPU, skipped")
            elif group.backend != "cuda":
                ranked.say(f"--graph: the {group.backend} backend cannot be captured, skipped")
            else:
                static_x = x.clone()
                graph, static_y = capture_graph(lambda: forward(static_x), device)
                graph.replay()
                torch.cuda.synchronize(device)
                diff = float((static_y.float() - y.float()).abs().max()) if y.numel() else 0.0
                ranked.say(f"CUDA graph: captured and replayed, max |replay - direct call| {diff:.3e}")
        if args.check:
            dense = DenseMoE.from_ep(layer)
            errors = _rel_errors(ranked, {"output": (y, dense(x))})
            ok = _verdict(ranked, errors, TOLERANCE[dtype])
        if args.bench:
            runs = {_run_name(group): lambda: forward(x)}
            if graph is not None:
                runs[f"{_run_name(group)} graph"] = graph.replay
            ref_group = _reference_twin(group, sizes, "ll", ranked, args)
            if ref_group is not None:
                ref_forward = runner(layer.on_group(ref_group))
                runs["reference"] = lambda: ref_forward(x)
            _bench(ranked, args, runs, "decode layer forward")
            if ref_group is not None:
                ref_group.close()
    group.close()
    return ok


# ------------------------------------------------------------------------------------------- train


def _loss(y: torch.Tensor, target: torch.Tensor, global_tokens: int) -> torch.Tensor:
    """This rank's share of the global mean squared error."""
    return (y.float() - target).square().sum() / max(global_tokens * y.shape[1], 1)


def _check_train(
    ranked: Ranked,
    layer: EPMoE,
    x0: torch.Tensor,
    target: torch.Tensor,
    global_tokens: int,
) -> bool:
    x = x0.clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    _loss(y, target, global_tokens).backward()
    layer.sync_router_grads()

    dense = DenseMoE.from_ep(layer)
    xd = x0.clone().requires_grad_()
    yd = dense(xd)
    _loss(yd, target, global_tokens).backward()
    pairs = {"output": (y, yd), "grad input": (x.grad, xd.grad)}
    assert dense.router.weight.grad is not None
    dist.all_reduce(dense.router.weight.grad, group=ranked.pg)
    # the router is replicated: compare on rank 0 only so the norms are not counted R times
    pairs["grad router"] = (
        (layer.router.weight.grad, dense.router.weight.grad)
        if ranked.rank == 0
        else (torch.zeros(0), torch.zeros(0))
    )
    first, local = layer.first_expert, layer.group.num_local_experts
    for name, param in layer.experts.named_parameters():
        want = dict(dense.experts.named_parameters())[name].grad
        assert want is not None and param.grad is not None
        dist.all_reduce(want, group=ranked.pg)  # every rank's tokens reach every expert
        pairs[f"grad {name}"] = (param.grad, want[first : first + local])
    layer.zero_grad()
    return _verdict(ranked, _rel_errors(ranked, pairs), TOLERANCE["bf16"])


def run_train(args: argparse.Namespace, ranked: Ranked) -> bool:
    device = ranked.device
    sizes = (args.experts, args.tokens, args.hidden)
    group = ncclep.Group(*sizes, mode="ht", process_group=ranked.pg, max_topk=args.topk, backend=args.backend)
    layer = EPMoE(
        group, args.ffn, args.topk, activation=args.activation, alignment=args.alignment, seed=args.seed
    )
    x, target = _inputs(args, ranked.rank, device)
    global_tokens = int(ranked.sum([float(args.tokens)])[0])
    ranked.say(
        f"train: {ranked.world} ranks, {args.tokens} tokens/rank, hidden {args.hidden}, "
        f"{args.experts} experts (top-{args.topk}), ffn {args.ffn}, {args.activation}, "
        f"alignment {args.alignment}, backend {group.backend}"
    )
    ok = True
    if args.check:
        ok = _check_train(ranked, layer, x, target, global_tokens)

    if args.optim == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(layer.parameters(), lr=args.lr)
    else:
        opt = torch.optim.SGD(layer.parameters(), lr=args.lr)
    for step in range(args.steps):
        opt.zero_grad()
        loss = _loss(layer(x), target, global_tokens)
        loss.backward()
        layer.sync_router_grads()
        opt.step()
        ranked.say(f"step {step}: loss {ranked.sum([float(loss.detach())])[0]:.6f}")

    if args.bench:

        def step_fn(lay: EPMoE) -> Callable[[], None]:
            def run() -> None:
                xg = x.clone().requires_grad_()
                _loss(lay(xg), target, global_tokens).backward()

            return run

        runs = {_run_name(group): step_fn(layer)}
        ref_group = _reference_twin(group, sizes, "ht", ranked, args)
        if ref_group is not None:
            runs["reference"] = step_fn(layer.on_group(ref_group))
        _bench(ranked, args, runs, "train layer forward+backward")
        layer.zero_grad()
        if ref_group is not None:
            ref_group.close()
    group.close()
    return ok


# ------------------------------------------------------------------------------------------- launch


def run_rank(args: argparse.Namespace, pg: dist.ProcessGroup | None, device: torch.device) -> int:
    ranked = Ranked(pg, device)
    gpu = device.type == "cuda"
    _fill_defaults(args, ranked.world, gpu)
    if not gpu:
        ranked.say(CPU_NOTICE.format(n=ranked.world))
    ok = run_decode(args, ranked) if args.mode == "decode" else run_train(args, ranked)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return launch(run_rank, args, args.nprocs, "MoE example")


if __name__ == "__main__":
    sys.exit(main())
