"""Pure-PyTorch experts for the harness: SiLU-gated MLPs in vLLM's weight layout, run on what a
prepare hands over (batched or standard format), and the same MoE computed densely on one process.

Weights are the same on every rank (one seed), so each rank computes its own tokens' expected
output with every expert present, without communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ncclep import fp8


@dataclass
class ExpertWeights:
    """``w1 [E, 2F, H]`` (gate rows first, then up) and ``w2 [E, H, F]``, bf16, indexed by physical expert."""

    w1: torch.Tensor
    w2: torch.Tensor

    @classmethod
    def make(
        cls, experts: int, hidden: int, ffn: int, device: torch.device, seed: int = 1234
    ) -> ExpertWeights:
        g = torch.Generator().manual_seed(seed)
        w1 = torch.randn(experts, 2 * ffn, hidden, generator=g) / hidden**0.5
        w2 = torch.randn(experts, hidden, ffn, generator=g) / ffn**0.5
        return cls(w1.to(torch.bfloat16).to(device), w2.to(torch.bfloat16).to(device))

    def mlp(self, expert: int | slice, x: torch.Tensor) -> torch.Tensor:
        """fp32 ``silu(x W_gate^T) * (x W_up^T) W2^T``; batched over experts when ``expert`` is a slice."""
        w1, w2 = self.w1[expert].float(), self.w2[expert].float()
        h = x.float() @ w1.transpose(-1, -2)
        gate, up = h.chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w2.transpose(-1, -2)


def scales_to_float(scales: torch.Tensor) -> torch.Tensor:
    """fp32 scales ``[..., H/128]`` from fp32 ones or from int32 words of four packed UE8M0 exponents."""
    if scales.dtype == torch.int32:
        exponents = scales.contiguous().view(torch.uint8)
        return fp8.scales_to_float(exponents.view(fp8.UE8M0_DTYPE))
    return scales.float()


def activations(x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """fp32 values of prepared rows: bf16 as they are, fp8 times its per-128-channel scales."""
    if scales is None:
        return x.float()
    return fp8.dequantize(x, scales_to_float(scales))


def batched_experts(
    weights: ExpertWeights,
    local: slice,
    x: torch.Tensor,
    scales: torch.Tensor | None,
    expert_num_tokens: torch.Tensor,
) -> torch.Tensor:
    """Batched format ``[L, M, H]`` -> ``[L, M, H]`` bf16, unweighted. Rows past each expert's count
    are NaN, so a finalize that reads them shows. No host synchronisation (CUDA-graph safe)."""
    out = weights.mlp(local, activations(x, scales)).to(torch.bfloat16)
    rows = torch.arange(x.shape[1], device=x.device)
    padding = rows.unsqueeze(0) >= expert_num_tokens.to(rows.dtype).unsqueeze(1)
    return out.masked_fill(padding.unsqueeze(-1), float("nan"))


def standard_experts(
    weights: ExpertWeights,
    x: torch.Tensor,
    scales: torch.Tensor | None,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_map: torch.Tensor,
    reduce: bool,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """Standard format: rows ``[n, H]`` with global ``topk_ids [n, K]``; ``expert_map`` gives each
    global id's local index (-1: another rank's). Unreduced ``[n, K, H]`` (zeros for other ranks'
    choices, as vLLM's experts leave them), or ``[n, H]`` weighted and summed when ``reduce``."""
    values = activations(x, scales)
    local_ids = expert_map[topk_ids.long()]
    per_choice = torch.zeros(*topk_ids.shape, x.shape[-1], device=x.device)
    for e in torch.unique(local_ids[local_ids >= 0]).tolist():
        rows, slots = (local_ids == e).nonzero(as_tuple=True)
        global_id = int((expert_map == e).nonzero()[0])
        per_choice[rows, slots] = weights.mlp(global_id, values[rows])
    if not reduce:
        return per_choice.to(torch.bfloat16)
    if not apply_router_weight_on_input:
        per_choice = per_choice * topk_weights.float().unsqueeze(-1)
    return per_choice.sum(dim=1).to(torch.bfloat16)


def dense_moe(
    weights: ExpertWeights,
    x: torch.Tensor,
    physical_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    apply_router_weight_on_input: bool,
    quantize: str,
) -> torch.Tensor:
    """The expected output in fp32: ``Σ_k w_k · expert_k(x)``, or ``Σ_k expert_k(w_k · x)`` with
    the weights on the input (bf16 product, as the prepare computes it). ``quantize``: ``"bf16"``,
    ``"fp8"`` or ``"fp8-ue8m0"``: the input the experts see goes through ncclep's fp8 arithmetic
    (vLLM's per-token-group quantisation may differ from it by one fp8 step on a few values)."""
    if apply_router_weight_on_input:
        x = x * topk_weights.to(x.dtype)
    values = x.float()
    if quantize != "bf16":
        values = fp8.dequantize(*fp8.quantize(x, ue8m0=quantize == "fp8-ue8m0"))
    out = torch.zeros(x.shape[0], x.shape[-1], device=x.device)
    for k in range(physical_ids.shape[1]):
        for e in torch.unique(physical_ids[:, k]).tolist():
            rows = (physical_ids[:, k] == e).nonzero(as_tuple=True)[0]
            y = weights.mlp(e, values[rows])
            out[rows] += y if apply_router_weight_on_input else y * topk_weights[rows, k : k + 1].float()
    return out
