"""What each rank of each fault case raised, after how long: a record per case, for a note or a
review, when ``NCCLEP_FAULT_REPORT`` names a file (JSON lines, appended). The tests judge the
same results; this only writes them down.

    NCCLEP_FAULT_REPORT=faults.jsonl python -m pytest tests/faults
    python tests/faults/fault_report.py faults.jsonl      # one line per case and rank
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

REPORT = os.environ.get("NCCLEP_FAULT_REPORT")


def _step(rec: Any) -> Any:
    """A step's record without its message (the tests check the messages)."""
    if not isinstance(rec, dict):
        return rec
    if "outcome" in rec:
        return {k: rec[k] for k in ("outcome", "reason", "peer", "s") if rec.get(k) is not None}
    return {name: _step(sub) for name, sub in rec.items()}


def record(path: str, outcomes: list[tuple[str, Any]]) -> None:
    """Append the current test's per-rank outcomes to ``path``."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("::")[-1]
    ranks = [
        {"kind": kind, **({k: _step(v) for k, v in value.items()} if kind == "ok" else {})}
        for kind, value in outcomes
    ]
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, "ranks": ranks}) + "\n")


def _text(rec: Any) -> str:
    if rec is None:
        return "-"
    if "outcome" not in rec:
        return " ".join(f"{name}:{_text(sub)}" for name, sub in rec.items())
    what = rec["outcome"]
    if rec.get("reason"):
        what += f"({rec['reason']}" + (f", rank {rec['peer']}" if rec.get("peer") is not None else "") + ")"
    return what + (f" {rec['s']:.2f}s" if "s" in rec else "")


def main(path: str) -> None:
    for line in Path(path).read_text().splitlines():
        case = json.loads(line)
        for rank, res in enumerate(case["ranks"]):
            steps = " | ".join(f"{k}: {_text(v)}" for k, v in res.items() if k != "kind")
            print(f"{case['test']:<55} rank {rank}: {steps or res['kind']}")


if __name__ == "__main__":
    main(sys.argv[1])
