"""The sizes a group is built for, and the output sizes that follow from them.

This is the one Python module for what the reference backend and the fake (meta) kernels need.
Where the CUDA extension is built, output sizes come from the C library (``ncclepHTNumRowsFor``),
which owns them; the formulas here serve the pure-Python install and are checked against the C
library's by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _native, fp8
from .errors import InvalidArgument

MODES = ("ll", "ht")
LAYOUTS = ("flat", "expert_major")
LAYOUT_IDS = {"flat": 0, "expert_major": 1}  # NCCLEP_HT_LAYOUT_*
MODE_IDS = {"ll": 0, "ht": 1}  # NCCLEP_MODE_*
LL_HIDDEN_MULTIPLE = fp8.BLOCK  # one fp8 scale per block of channels
HT_HIDDEN_MULTIPLE = 8  # 16-byte bf16 rows
MAX_TIMEOUT_S = 1e6  # deadlines become timedeltas and device clock counts


@dataclass(frozen=True)
class GroupConfig:
    """Static sizes of a group. Every output shape is a function of these and the input shapes."""

    num_experts: int
    max_tokens_per_rank: int
    hidden: int
    mode: str
    world_size: int
    max_topk: int = 8
    num_sms: int | None = None
    timeout_s: float = 100.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}, got {self.mode!r}", reason="option")
        for name in ("num_experts", "max_tokens_per_rank", "hidden", "world_size", "max_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive int, got {value!r}", reason="option")
        if self.num_experts % self.world_size:
            raise InvalidArgument(
                f"num_experts ({self.num_experts}) must be divisible by the world size ({self.world_size})",
                reason="option",
            )
        if self.max_topk > self.num_experts:
            raise InvalidArgument(
                f"max_topk ({self.max_topk}) must be at most num_experts ({self.num_experts})", reason="topk"
            )
        if self.mode == "ll" and self.hidden % LL_HIDDEN_MULTIPLE:
            raise InvalidArgument(
                f"LL mode needs hidden divisible by {LL_HIDDEN_MULTIPLE}, got {self.hidden}", reason="hidden"
            )
        if self.mode == "ht" and self.hidden % HT_HIDDEN_MULTIPLE:
            raise InvalidArgument(
                f"HT mode needs hidden divisible by {HT_HIDDEN_MULTIPLE} (16-byte rows), got {self.hidden}",
                reason="hidden",
            )
        if self.num_sms is not None and (
            not isinstance(self.num_sms, int) or isinstance(self.num_sms, bool) or self.num_sms <= 0
        ):
            raise InvalidArgument(
                f"num_sms must be a positive int or None, got {self.num_sms!r}", reason="option"
            )
        timeout = self.timeout_s
        if (
            not isinstance(timeout, (int, float))
            or isinstance(timeout, bool)
            or not 0 < timeout < MAX_TIMEOUT_S  # also refuses NaN and infinity
        ):
            raise InvalidArgument(
                f"timeout_s must be positive and below {MAX_TIMEOUT_S:g} seconds, got {timeout!r}",
                reason="option",
            )

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def ll_rows_per_expert(self) -> int:
        """Rows of each local expert in the LL output: every rank may send every token."""
        return self.world_size * self.max_tokens_per_rank

    def ht_num_rows(self, topk: int, layout: str, alignment: int) -> int:
        """Worst-case rows of an HT dispatch output."""
        if _native.available():
            return int(
                _native.module().ht_num_rows(
                    self.num_experts,
                    self.max_tokens_per_rank,
                    self.hidden,
                    self.max_topk,
                    self.world_size,
                    topk,
                    LAYOUT_IDS[layout],
                    alignment,
                )
            )
        return ht_num_rows_python(self, topk, layout, alignment)


def ht_num_rows_python(cfg: GroupConfig, topk: int, layout: str, alignment: int) -> int:
    """The pure-Python install's copy of ``ncclepHTNumRowsFor`` (tests hold the two equal)."""
    slots = cfg.world_size * cfg.max_tokens_per_rank
    if layout == "flat":
        return slots
    copies = min(topk, cfg.num_local_experts)
    return slots * copies + cfg.num_local_experts * (alignment - 1)
