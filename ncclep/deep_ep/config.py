"""``Config``: DeepEP's performance settings of the HT ops, and what ncclep takes from them.

DeepEP's HT kernels stream tokens through per-channel ring buffers whose chunk sizes ``Config``
sets. ncclep's HT kernels have no such rings: of a ``Config`` only ``num_sms`` counts, and only
when the Buffer makes an HT group (the SMs a group's kernels use are fixed when it is made). The
chunk sizes are kept, checked as DeepEP checks them, and otherwise unused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument

NVL_PEERS = 8  # DeepEP's ranks per NVLink domain (its NUM_MAX_NVL_PEERS): larger groups span nodes
HINT_TOKEN_BYTES = 1024  # per received token: top-k ids, weights, scales and flags, generously
HINT_GRANULARITY = 2 << 20


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass
class Config:
    """Performance settings of one HT call (DeepEP's ``deep_ep.Config``, same arguments and order).

    Arguments:
        num_sms: SMs of the HT kernels; ncclep uses it when this call makes the Buffer's HT group
            (0: ncclep's default), and ignores it afterwards.
        num_max_nvl_chunked_send_tokens: DeepEP's NVLink send chunk; unused by ncclep.
        num_max_nvl_chunked_recv_tokens: DeepEP's NVLink receive ring; unused by ncclep.
        num_max_rdma_chunked_send_tokens: DeepEP's RDMA send chunk; unused by ncclep.
        num_max_rdma_chunked_recv_tokens: DeepEP's RDMA receive ring; unused by ncclep.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        if self.num_sms < 0:
            raise InvalidArgument(f"Config: num_sms must be >= 0, got {self.num_sms}")
        if not 0 < self.num_max_nvl_chunked_send_tokens < self.num_max_nvl_chunked_recv_tokens:
            raise InvalidArgument(
                "Config: need 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, got "
                f"{self.num_max_nvl_chunked_send_tokens} and {self.num_max_nvl_chunked_recv_tokens}"
            )
        if not 0 < self.num_max_rdma_chunked_send_tokens < self.num_max_rdma_chunked_recv_tokens:
            raise InvalidArgument(
                "Config: need 0 < num_max_rdma_chunked_send_tokens < num_max_rdma_chunked_recv_tokens, got "
                f"{self.num_max_rdma_chunked_send_tokens} and {self.num_max_rdma_chunked_recv_tokens}"
            )

    def _ring_bytes(self, hidden_bytes: int, peers: int, tokens: int) -> int:
        channels = max(1, self.num_sms // 2)
        per_token = int(hidden_bytes) + HINT_TOKEN_BYTES
        return _round_up(channels * peers * tokens * per_token, HINT_GRANULARITY)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes to pass as ``Buffer(num_nvl_bytes=...)`` for rows of ``hidden_bytes``.

        DeepEP sizes its NVLink rings with this. ncclep's HT groups are sized by the calls (the
        most tokens any rank passes) and grow as needed, so the figure is only the positive size
        DeepEP-style callers expect: what rings of this config's shape would hold.
        """
        return self._ring_bytes(hidden_bytes, min(num_ranks, NVL_PEERS), self.num_max_nvl_chunked_recv_tokens)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes to pass as ``Buffer(num_rdma_bytes=...)`` for HT across nodes: 0 within one NVLink
        domain (up to 8 ranks), as with DeepEP; otherwise the same kind of estimate as
        :meth:`get_nvl_buffer_size_hint`, per node."""
        if num_ranks <= NVL_PEERS:
            return 0
        return self._ring_bytes(hidden_bytes, num_ranks // NVL_PEERS, self.num_max_rdma_chunked_recv_tokens)


__all__ = ["Config"]
