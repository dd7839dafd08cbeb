"""The fault report writes down what the cases' ranks returned, one line per case and rank."""

from __future__ import annotations

from pathlib import Path

import fault_report
import pytest


def test_report_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "faults.jsonl"
    outcomes = [
        (
            "ok",
            {
                "warmup": {"outcome": "correct", "s": 0.012, "msg": "-"},
                "fault": {"outcome": "CommError", "reason": "timeout", "peer": 1, "s": 4.0, "msg": "long"},
                "later": None,
                "after": {"group": {"outcome": "correct", "s": 0.01}},
            },
        ),
        ("died", "exit code -9"),
    ]
    fault_report.record(str(path), outcomes)
    fault_report.main(str(path))
    rank0, rank1 = capsys.readouterr().out.splitlines()
    assert rank0.endswith(
        "rank 0: warmup: correct 0.01s | fault: CommError(timeout, rank 1) 4.00s | later: - | "
        "after: group:correct 0.01s"
    )
    assert "long" not in rank0  # messages are the tests' to check
    assert rank1.endswith("rank 1: died")
    assert rank0.startswith("test_report_round_trip ")
