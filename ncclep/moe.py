"""MoE layers on ncclep: a top-k router, grouped expert MLPs, an expert-parallel layer and its
one-process ("dense") twin.

:class:`EPMoE` is one MoE layer whose experts are spread over the ranks of an :class:`ncclep.Group`
(rank r holds experts ``[r*L, (r+1)*L)``); the router is replicated. What it runs depends on the
group's mode:

* ``"ll"`` (decode): router -> ``ll_dispatch`` (bf16, or fp8 dequantised before the MLP) ->
  grouped MLP over the expert-major rows ``[L, R*T, H]`` (padding rows are zeroed first, so
  whatever they held cannot reach the result) -> ``ll_combine``, which applies the top-k weights.
  No host synchronisation: it can be captured in a CUDA graph and traced by ``torch.compile``.
  Inference only (the LL ops have no backward): call it under ``torch.no_grad()``.
* ``"ht"`` (prefill, training): router -> ``ht_dispatch(layout="expert_major")`` -> each local
  expert's MLP on its segment (one host read of ``expert_counts`` per call: the segment sizes) ->
  each row times the weight of its own expert -> ``ht_combine``. Differentiable end to end
  (ncclep registers the backward of the HT ops), so input, router and expert weights all get
  gradients. Padding rows produce zeros and receive zero gradient.

:class:`DenseMoE` computes the same function on one process with every expert present; build it
from a distributed layer with :meth:`DenseMoE.from_ep` (a collective) to check that layer.

Initialisation: the router is drawn from a generator seeded ``seed + ROUTER_SEED_OFFSET`` (the
same on every rank), rank r's experts from one seeded ``seed + r``, so the whole model is a
function of ``seed`` and the world size. Parameters are kept in ``param_dtype`` (fp32 by default)
and cast to the activations' dtype (bf16) for the expert matmuls; routing runs in fp32.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import fp8
from .group import Group
from .handles import HTDispatchOutput, LLDispatchOutput

ACTIVATIONS = ("swiglu", "gelu")
ROUTER_SEED_OFFSET = 1 << 32  # keeps the router's random stream apart from every rank's experts'


def route(x: torch.Tensor, weight: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing in fp32: ``(topk_idx [B, K] int64, topk_weights [B, K] fp32)``.

    Scores are ``softmax(x @ weight.T)`` over all experts; the k largest are kept and renormalised
    to sum to one.
    """
    probs = torch.softmax(x.float() @ weight.float().t(), dim=-1)
    values, idx = probs.topk(topk, dim=-1)
    return idx, values / values.sum(dim=-1, keepdim=True)


def expert_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """One expert MLP, or a batch of them: ``x [..., N, H]`` with ``w1 [..., H, F]``,
    ``w2 [..., F, H]`` (and the SwiGLU gate ``w3 [..., H, F]``) -> ``[..., N, H]`` in ``x.dtype``.

    Matmuls run in ``x.dtype``; the activation in fp32.
    """
    dtype = x.dtype
    h = torch.matmul(x, w1.to(dtype)).float()
    if activation == "swiglu":
        if w3 is None:
            raise ValueError("a SwiGLU expert needs its gate weight w3")
        h = F.silu(h) * torch.matmul(x, w3.to(dtype)).float()
    elif activation == "gelu":
        h = F.gelu(h)
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return torch.matmul(h.to(dtype), w2.to(dtype))


class Router(nn.Module):
    """Linear ``hidden -> num_experts`` followed by top-k of the softmax scores (fp32)."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        topk: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk must be between 1 and num_experts ({num_experts}), got {topk}")
        self.hidden, self.num_experts, self.topk = hidden, num_experts, topk
        weight = torch.randn(num_experts, hidden, generator=generator) / math.sqrt(hidden)
        self.weight = nn.Parameter(weight.to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(x, self.weight, self.topk)


class GroupedExperts(nn.Module):
    """``num_experts`` MLPs of the same shape, applied together.

    Weights: ``w1 [E, H, F]``, ``w2 [E, F, H]``, and for SwiGLU the gate ``w3 [E, H, F]``
    (``silu(x @ w1) * (x @ w3) @ w2``); GELU is ``gelu(x @ w1) @ w2``.
    """

    w3: nn.Parameter | None

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        ffn: int,
        activation: str = "swiglu",
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.hidden, self.ffn, self.activation = num_experts, hidden, ffn, activation

        def draw(*shape: int) -> nn.Parameter:
            w = torch.randn(*shape, generator=generator) / math.sqrt(shape[-2])
            return nn.Parameter(w.to(device=device, dtype=dtype))

        self.w1 = draw(num_experts, hidden, ffn)
        self.w2 = draw(num_experts, ffn, hidden)
        self.w3 = draw(num_experts, hidden, ffn) if activation == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expert-major rows ``x [E, N, H]`` -> ``[E, N, H]`` (one batched matmul per layer)."""
        return expert_mlp(x, self.w1, self.w2, self.w3, self.activation)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x [N, H]``."""
        w3 = self.w3[e] if self.w3 is not None else None
        return expert_mlp(x, self.w1[e], self.w2[e], w3, self.activation)

    def forward_segments(self, x: torch.Tensor, counts: list[int], alignment: int) -> torch.Tensor:
        """Rows ``x [N, H]`` laid out as contiguous per-expert segments, each of ``counts[e]`` real
        rows padded to a multiple of ``alignment`` -> ``[N, H]``; padding rows and rows past the
        last segment come out zero and take no gradient."""
        pieces: list[torch.Tensor] = []
        start = 0
        for e, count in enumerate(counts):
            if count:
                pieces.append(self.expert(e, x[start : start + count]))
            padded = -(-count // alignment) * alignment
            if padded > count:
                pieces.append(x.new_zeros(padded - count, x.shape[1]))
            start += padded
        if start < x.shape[0]:
            pieces.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
        return torch.cat(pieces) if pieces else x.new_zeros(x.shape)


def segment_experts(counts: list[int], alignment: int, rows: int, device: torch.device) -> torch.Tensor:
    """``[rows]`` int64: the local expert of each real row of an expert_major layout, and
    ``len(counts)`` (no expert) on padding rows and rows past the last segment."""
    local = len(counts)
    ids: list[int] = []
    for e, count in enumerate(counts):
        ids += [e] * count + [local] * (-(-count // alignment) * alignment - count)
    ids += [local] * (rows - len(ids))
    return torch.tensor(ids, dtype=torch.int64, device=device)


class EPMoE(nn.Module):
    """An expert-parallel MoE layer over ``group`` (decode for an ``"ll"`` group, prefill and
    training for an ``"ht"`` group; see the module docstring).

    Args:
        group: the expert-parallel group; ``group.num_experts`` experts in all, ``L`` per rank.
        ffn: the experts' intermediate size.
        topk: experts per token (at most ``group.config.max_topk``).
        hidden: the model's hidden size (default ``group.hidden``).
        activation: ``"swiglu"`` or ``"gelu"``.
        use_fp8: LL only: dispatch in fp8 e4m3 with per-128-channel scales.
        alignment: HT only: rows of each expert segment are padded to a multiple of it.
        seed: initialisation seed (see the module docstring).
        param_dtype: dtype of the parameters.
        router, experts: existing modules to use instead of new ones (e.g. the same parameters on
            another group).
    """

    def __init__(
        self,
        group: Group,
        ffn: int,
        topk: int,
        *,
        hidden: int | None = None,
        activation: str = "swiglu",
        use_fp8: bool = False,
        alignment: int = 1,
        seed: int = 0,
        param_dtype: torch.dtype = torch.float32,
        router: Router | None = None,
        experts: GroupedExperts | None = None,
    ) -> None:
        super().__init__()
        hidden = group.hidden if hidden is None else hidden
        if topk > group.config.max_topk:
            raise ValueError(f"topk ({topk}) exceeds the group's max_topk ({group.config.max_topk})")
        if use_fp8 and group.mode != "ll":
            raise ValueError("use_fp8 is for the LL (decode) path")
        if alignment < 1:
            raise ValueError(f"alignment must be at least 1, got {alignment}")
        self.group, self.topk, self.use_fp8, self.alignment = group, topk, use_fp8, alignment
        device = group.device
        if router is None:
            g = torch.Generator().manual_seed(seed + ROUTER_SEED_OFFSET)
            router = Router(hidden, group.num_experts, topk, generator=g, device=device, dtype=param_dtype)
        if experts is None:
            g = torch.Generator().manual_seed(seed + group.rank)
            experts = GroupedExperts(
                group.num_local_experts,
                hidden,
                ffn,
                activation,
                generator=g,
                device=device,
                dtype=param_dtype,
            )
        if router.num_experts != group.num_experts or experts.num_experts != group.num_local_experts:
            raise ValueError("router/experts do not match the group's expert counts")
        self.router, self.experts = router, experts

    def on_group(self, group: Group) -> EPMoE:
        """The same layer (shared parameters) running on another group of the same sizes."""
        return EPMoE(
            group,
            self.experts.ffn,
            self.topk,
            hidden=self.experts.hidden,
            use_fp8=self.use_fp8,
            alignment=self.alignment,
            router=self.router,
            experts=self.experts,
        )

    @property
    def first_expert(self) -> int:
        """Global id of this rank's first expert."""
        return self.group.rank * self.group.num_local_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H]`` bf16 (B <= the group's max_tokens_per_rank) -> ``[B, H]`` bf16."""
        if self.group.mode == "ll":
            return self.forward_ll(x)
        return self.forward_ht(x)

    def forward_ll(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = self.router(x)
        out = cast(LLDispatchOutput, self.group.ll_dispatch(x, topk_idx, topk_weights, use_fp8=self.use_fp8))
        rows = out.x
        if out.scales is not None:
            rows = fp8.dequantize(rows, out.scales).to(x.dtype)
        # padding rows hold anything (NaN included): zero them so every output row is finite
        real = torch.arange(rows.shape[1], device=rows.device) < out.expert_counts.unsqueeze(1)
        rows = torch.where(real.unsqueeze(-1), rows, 0)
        expert_out = self.experts(rows)
        return cast(torch.Tensor, self.group.ll_combine(expert_out.contiguous(), out.handle))

    def forward_ht(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = self.router(x)
        out = cast(
            HTDispatchOutput,
            self.group.ht_dispatch(
                x, topk_idx, topk_weights, layout="expert_major", alignment=self.alignment
            ),
        )
        counts = [int(c) for c in out.expert_counts.tolist()]  # segment sizes: one host read
        rows = self.experts.forward_segments(out.x, counts, self.alignment)
        assert out.topk_weights is not None
        # each row carries the token's K choices: keep the weight of the row's own expert
        own = segment_experts(counts, self.alignment, rows.shape[0], rows.device)
        weight = torch.where(out.topk_idx == own.unsqueeze(1), out.topk_weights, 0.0).sum(dim=1)
        weighted = (rows.float() * weight.unsqueeze(1)).to(x.dtype)
        y, _ = cast(tuple[torch.Tensor, None], self.group.ht_combine(weighted, out.handle))
        return y

    def sync_router_grads(self) -> None:
        """Sum the replicated router's gradients over the group (before an optimizer step), so
        that every rank holds the gradient of the sum of all ranks' losses and stays in step."""
        grad = self.router.weight.grad
        if grad is not None:
            dist.all_reduce(grad, group=self.group.process_group)

    def gather_experts(self) -> dict[str, torch.Tensor]:
        """Every rank's expert weights concatenated in rank order: ``{"w1": [E, H, F], ...}``
        (a collective; detached copies)."""
        out: dict[str, torch.Tensor] = {}
        for name, param in self.experts.named_parameters():
            parts = [torch.empty_like(param) for _ in range(self.group.world_size)]
            dist.all_gather(parts, param.detach().contiguous(), group=self.group.process_group)
            out[name] = torch.cat(parts)
        return out


class DenseMoE(nn.Module):
    """The MoE layer on one process with every expert: ``y[b] = Σ_k w[b,k] · expert_k(x[b])``,
    reduced in fp32. ``quantize_fp8=True`` first rounds each token through the fp8 format of the
    LL dispatch (as the experts of a ``use_fp8`` :class:`EPMoE` see it)."""

    def __init__(
        self,
        hidden: int,
        ffn: int,
        num_experts: int,
        topk: int,
        activation: str = "swiglu",
        *,
        quantize_fp8: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.quantize_fp8 = quantize_fp8
        self.router = Router(hidden, num_experts, topk, device=device, dtype=dtype)
        self.experts = GroupedExperts(num_experts, hidden, ffn, activation, device=device, dtype=dtype)

    @classmethod
    def from_ep(cls, layer: EPMoE) -> DenseMoE:
        """The dense twin of ``layer``: its router and every rank's experts (in rank order).
        A collective: every rank of ``layer.group`` must call it."""
        experts = layer.gather_experts()
        dense = cls(
            layer.experts.hidden,
            layer.experts.ffn,
            layer.group.num_experts,
            layer.topk,
            layer.experts.activation,
            quantize_fp8=layer.use_fp8,
            device=layer.router.weight.device,
            dtype=layer.router.weight.dtype,
        )
        with torch.no_grad():
            dense.router.weight.copy_(layer.router.weight)
            for name, param in dense.experts.named_parameters():
                param.copy_(experts[name])
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = self.router(x)
        inputs = x
        if self.quantize_fp8:
            inputs = fp8.dequantize(*fp8.quantize(x)).to(x.dtype)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.experts.num_experts):
            token, k = (topk_idx == e).nonzero(as_tuple=True)
            if token.numel():
                rows = self.experts.expert(e, inputs[token]).float() * topk_weights[token, k].unsqueeze(1)
                y = y.index_add(0, token, rows)
        return y.to(x.dtype)
