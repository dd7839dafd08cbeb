"""Where the backend is chosen (ncclep.backends): what the C library answers decides, the reason is
kept, ``auto`` warns once per process and reason, ``cuda`` raises. The C side of the decision is
tests/test_kernel_facts.py; here the extension and its communicator are stand-ins."""

from __future__ import annotations

import warnings

import pytest
import torch

import ncclep
from ncclep import backends
from ncclep.config import GroupConfig

CFG = GroupConfig(num_experts=256, max_tokens_per_rank=4096, hidden=7168, mode="ht", world_size=16)
GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


class Comm:
    """Stands in for ncclep._C.Communicator: its C library's answer for the group."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason

    def kernel_support(self) -> str | None:
        return self.reason


@pytest.fixture
def extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends._native, "available", lambda: True)
    monkeypatch.setattr(backends, "_warned", set())


@pytest.mark.usefixtures("extension")
def test_served_group_runs_cuda_without_a_word() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.choose("auto", CFG, GPU, Comm(None)) == ("cuda", None)
        assert backends.choose("cuda", CFG, GPU, Comm(None)) == ("cuda", None)


@pytest.mark.usefixtures("extension")
def test_auto_falls_back_with_one_warning_per_reason() -> None:
    why = "ncclep was built against NCCL 2.28.9 headers but NCCL 2.30.7 is loaded"
    with pytest.warns(ncclep.FallbackWarning, match="HT group runs on the reference backend.*2.30.7") as seen:
        for _ in range(3):
            assert backends.choose("auto", CFG, GPU, Comm(why)) == ("reference", why)
    assert len(seen) == 1
    with pytest.warns(ncclep.FallbackWarning, match="need GIN"):
        backends.choose("auto", CFG, GPU, Comm("peers off the NVLink (LSA) team need GIN"))


@pytest.mark.usefixtures("extension")
def test_cuda_raises_with_the_reason() -> None:
    with pytest.raises(
        ncclep.NcclepError, match="backend='cuda' is not available: the HT kernels take at most"
    ):
        backends.choose("cuda", CFG, GPU, Comm("the HT kernels take at most 32 ranks, got 64"))


def test_reasons_without_the_extension_or_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends._native, "available", lambda: False)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(ncclep.FallbackWarning, match="installed without its CUDA extension"):
        name, why = backends.choose("auto", CFG, GPU, None)
    assert name == "reference" and "pip install -e . --no-build-isolation" in str(why)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CPU group is the reference backend's own ground: no warning
        assert backends.choose("auto", CFG, CPU, None) == (
            "reference",
            "the group is not on CUDA devices (its process group is not NCCL)",
        )
        assert backends.choose("reference", CFG, GPU, None) == (
            "reference",
            "backend='reference' was requested",
        )


def test_each_group_builds_its_own_modes_backend() -> None:
    ll = GroupConfig(num_experts=8, max_tokens_per_rank=4, hidden=128, mode="ll", world_size=2)
    assert type(backends.build("reference", ll, 0, None, None)).__name__ == "ReferenceLL"
    assert type(backends.build("reference", CFG, 0, None, None)).__name__ == "ReferenceHT"
