"""What a user's first ``ncclep.Group`` reports on this machine: the NCCL loaded and built against,
which backend each mode's group got and why, the topology and the buffers. One process per GPU
(or torchrun/mpirun ranks); rank 0 prints. ``python bench/bringup_report.py``"""

from __future__ import annotations

import sys
from typing import Any

import torch

import ncclep
from ncclep import _native
from ncclep.launch import launch

SIZES = {"ll": (256, 128, 7168), "ht": (256, 4096, 7168)}


def run(args: Any, process_group: Any, device: torch.device) -> int:
    lines = []
    if _native.available():
        c = _native.module()
        lines.append(
            f"ncclep._C {c.version()}: NCCL loaded {c.nccl_version()}, built against {c.NCCL_HEADER_VERSION}"
        )
    else:
        lines.append(f"ncclep._C not importable: {_native.IMPORT_ERROR}")
    for mode, (experts, tokens, hidden) in SIZES.items():
        with ncclep.Group(experts, tokens, hidden, mode=mode, process_group=process_group) as group:
            lines.append(f"{group!r}")
            lines.append(f"  backend_reason: {group.backend_reason}")
            lines.append(
                f"  ranks_per_node={group.ranks_per_node} num_nodes={group.num_nodes} "
                f"buffer_bytes={group.buffer_bytes} kernel_sms={group.kernel_sms}"
            )
            lines.append(f"  native_info: {group.native_info}")
            if group.backend == "cuda":
                lines.append(f"  LSA self-check: {'ok' if group.check_lsa() else 'FAILED'}")
    if torch.distributed.get_rank() == 0:
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(launch(run, None, None, "bring-up report"))
