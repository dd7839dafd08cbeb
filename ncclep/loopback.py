"""Every rank of a group in this process, on one GPU (``ncclep._C.loopback``): each rank's window
mapped on the device as an NVLink team's would be, no NCCL. For tests and benchmarks of the
kernels' multi-rank protocols where one GPU is all there is; nothing about speed over NVLink."""

from __future__ import annotations

import torch

from . import _native
from .config import MODE_IDS, GroupConfig
from .cuda_ht import CudaHT
from .cuda_ll import CudaLL


def loopback_ranks(
    cfg: GroupConfig, device: torch.device, virtual_nodes: int = 1
) -> list[CudaLL] | list[CudaHT]:
    """The CUDA backend of every rank of a ``cfg`` group (its mode's) on ``device``, in rank order;
    ``virtual_nodes`` > 1 splits the ranks into emulated nodes. Each rank's calls go on a stream of
    its own; close each rank's ``comm`` when done."""
    comms = _native.module().loopback(
        cfg.world_size,
        device.index,
        MODE_IDS[cfg.mode],
        cfg.num_experts,
        cfg.max_tokens_per_rank,
        cfg.hidden,
        cfg.max_topk,
        cfg.num_sms,
        cfg.timeout_s,
        virtual_nodes=virtual_nodes,
    )
    backend = CudaLL if cfg.mode == "ll" else CudaHT
    return [backend(cfg, r, c, device) for r, c in enumerate(comms)]
