"""The sizes a group is built for, and what follows from them."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("ll", "ht")
LAYOUTS = ("flat", "expert_major")
MAX_TOPK_LIMIT = 32
DEFAULT_HT_SMS = 24


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
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("num_experts", "max_tokens_per_rank", "hidden", "world_size", "max_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_experts % self.world_size:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be divisible by the world size ({self.world_size})"
            )
        if self.max_topk > MAX_TOPK_LIMIT:
            raise ValueError(f"max_topk must be at most {MAX_TOPK_LIMIT}, got {self.max_topk}")
        if self.mode == "ll" and self.hidden % 128:
            raise ValueError(f"LL mode needs hidden divisible by 128, got {self.hidden}")
        if self.mode == "ht" and self.hidden % 8:
            raise ValueError(f"HT mode needs hidden divisible by 8 (16-byte rows), got {self.hidden}")
        if self.num_sms is not None and self.num_sms <= 0:
            raise ValueError(f"num_sms must be positive or None, got {self.num_sms}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def ll_rows_per_expert(self) -> int:
        """Rows of each local expert in the LL output: every rank may send every token."""
        return self.world_size * self.max_tokens_per_rank

    def ht_num_rows(self, topk: int, layout: str, alignment: int) -> int:
        """Worst-case rows of an HT dispatch output."""
        slots = self.world_size * self.max_tokens_per_rank
        if layout == "flat":
            return slots
        copies = min(topk, self.num_local_experts)
        return slots * copies + self.num_local_experts * (alignment - 1)
