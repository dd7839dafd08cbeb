"""ncclep: expert-parallel dispatch and combine for Mixture-of-Experts models on NCCL's Device API.

Quick start::

    import torch.distributed as dist, ncclep
    dist.init_process_group("nccl")
    group = ncclep.Group(num_experts=256, max_tokens_per_rank=128, hidden=7168, mode="ll")
    recv_x, scales, counts, handle = group.ll_dispatch(x, topk_idx, topk_weights)
    y = group.ll_combine(expert_out, handle)
"""

from . import autograd, ops  # registers torch.ops.ncclep.* and the HT backward
from ._native import available as cuda_extension_available
from .config import GroupConfig
from .errors import CommError, FallbackWarning, InvalidArgument, NcclepError
from .group import Group, Pending, get_group
from .handles import HTDispatchOutput, HTHandle, LLDispatchOutput, LLHandle

__version__ = "0.1.0"

__all__ = [
    "CommError",
    "FallbackWarning",
    "Group",
    "GroupConfig",
    "HTDispatchOutput",
    "HTHandle",
    "InvalidArgument",
    "LLDispatchOutput",
    "LLHandle",
    "NcclepError",
    "Pending",
    "__version__",
    "autograd",
    "cuda_extension_available",
    "get_group",
    "ops",
]
