"""The error word's records become the right Python exceptions (no GPU needed: a stand-in comm)."""

from __future__ import annotations

import re

import pytest

from ncclep import CommError, InvalidArgument
from ncclep.config import GroupConfig
from ncclep.device_errors import raise_device_error

CFG = GroupConfig(num_experts=64, max_tokens_per_rank=8, hidden=256, mode="ll", world_size=4, timeout_s=3.0)


class Word:
    def __init__(self, record: tuple[str, str, int, int] | None) -> None:
        self.record = record

    def device_error(self) -> tuple[str, str, int, int] | None:
        return self.record


def test_no_record_raises_nothing() -> None:
    raise_device_error(Word(None), CFG, 0)


def test_timeout_names_phase_and_peer() -> None:
    expected = "ht_combine receive: rank 2 waited past the 3.0 s deadline for rank 1"
    with pytest.raises(CommError, match=re.escape(expected)) as e:
        raise_device_error(Word(("timeout", "ht_combine receive", 1, 0)), CFG, 2)
    assert (e.value.peer, e.value.phase) == (1, "ht_combine receive")


@pytest.mark.parametrize(
    "record,text",
    [
        (("bad_expert", "ll_dispatch send", -1, 99), r"expert id 99; ids must be -1 or in \[0, 64\)"),
        (("duplicate_expert", "ht_dispatch send", -1, 5), "row 5 .* twice"),
    ],
)
def test_bad_input_is_invalid_argument(record: tuple[str, str, int, int], text: str) -> None:
    with pytest.raises(InvalidArgument, match=text):
        raise_device_error(Word(record), CFG, 0)


def test_unknown_code_is_comm_error() -> None:
    with pytest.raises(CommError, match="unknown phase: device error code 9"):
        raise_device_error(Word(("code 9", "unknown phase", 3, 7)), CFG, 0)


def test_peer_rejection_names_the_rank_and_the_reason() -> None:
    # value 4 is the C library's code of "shape" (the codes: tests/test_kernel_facts.py)
    with pytest.raises(
        CommError, match=r"ll_combine receive: rank 3 rejected its input of that call \(shape"
    ) as e:
        raise_device_error(Word(("peer_rejected", "ll_combine receive", 3, 4)), CFG, 1)
    assert (e.value.reason, e.value.peer, e.value.rank, e.value.group_usable) == ("peer_rejected", 3, 1, True)
    assert "must be discarded" in str(e.value)


def test_a_broken_group_raises_broken_after_its_first_report() -> None:
    broke: list[CommError] = []
    word = Word(("timeout", "ht_dispatch receive", 2, 0))  # a timeout stays in the error word
    with pytest.raises(CommError) as first:
        raise_device_error(word, CFG, 0, broke)
    assert first.value.reason == "timeout" and not first.value.group_usable
    with pytest.raises(CommError, match=r"broke earlier .*waited past") as later:
        raise_device_error(word, CFG, 0, broke)
    assert (later.value.reason, later.value.peer, later.value.phase) == ("broken", 2, "ht_dispatch receive")


def test_usable_reports_do_not_break_the_group() -> None:
    broke: list[CommError] = []
    for record in (
        ("peer_rejected", "ht_combine receive", 1, 12),
        ("bad_expert", "ll_dispatch send", -1, 70),
    ):
        with pytest.raises((CommError, InvalidArgument)):
            raise_device_error(Word(record), CFG, 0, broke)
    assert broke == []
