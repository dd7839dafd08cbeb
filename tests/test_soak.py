"""bench/soak.py on CPU processes (the reference backend on both sides): the summary of a short
soak, that its checks fail on corrupted outputs (``--self-test-corrupt``), its comparisons (rows
in use only), the drift rule, and the command line's exit status. tests/gpu/test_soak_gpu.py runs
it on the CUDA kernels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cpu_process
from helpers import bench_script, soak_worker

import ncclep
from ncclep import testing as ncclep_testing
from ncclep.handles import HTHandle, LLHandle

# 40 LL calls: replays at 3, 7, ..., 39 (10); eager checks at 0, 10, 20, 30; replays checked every
# 10 // 4 = 2nd, and the last (call 39): 6. 20 HT calls: 5 replays, eager checks at 0 and 10,
# replays 0, 2, 4 checked.
TINY = ["--ll-iters", "40", "--ht-iters", "20", "--check-every", "10", "--graph-every", "4", "--quiet"]
EXPECTED = {"ll": (40, 30, 10, 4, 6), "ht": (20, 15, 5, 2, 3)}


def soak():  # type: ignore[no-untyped-def]
    return bench_script("soak")


def test_soak_summary(world2) -> None:  # type: ignore[no-untyped-def]
    docs = world2.run(soak_worker, TINY)
    doc = docs[0]
    assert docs[1]["modes"] == doc["modes"] and docs[1]["passed"] == doc["passed"]
    assert doc["passed"], soak().render(doc)
    assert doc["meta"]["backend"] == "reference" and doc["meta"]["world_size"] == 2
    for mode, (iters, eager, replays, checks, graph_checks) in EXPECTED.items():
        m = doc["modes"][mode]
        got = (m["iterations"], m["eager"], m["replays"], m["checks"], m["graph_checks"])
        assert got == (iters, eager, replays, checks, graph_checks), mode
        assert m["mismatches"] == 0 and m["first_mismatches"] == [] and m["device_errors"] == {}
        assert m["max_error"] == 0.0  # reference against reference: bit for bit
        assert not m["drift"] and m["wall_s"] > 0
        assert len(m["windows"]) == 10 and m["window"] == iters // 10
        assert sum(w["checks"] for w in m["windows"]) == checks
    text = soak().render(doc)
    assert text.startswith("ncclep soak: 2x CPU, reference vs reference")
    assert "ll max combine error per 4-iteration window" in text and text.endswith("PASS")


def test_soak_reports_corrupted_outputs(world2) -> None:  # type: ignore[no-untyped-def]
    """The first eager check's dispatch, the second's combine and the first replay check's combine
    are corrupted on every rank: those are reported, nothing else, and the run fails."""
    doc = world2.run(soak_worker, [*TINY, "--self-test-corrupt"])[0]
    assert not doc["passed"]
    for mode in ("ll", "ht"):
        m = doc["modes"][mode]
        # dispatch and graph: every rank (a count is corrupted where no row is in use); combine:
        # ranks with tokens
        assert 4 <= m["mismatches"] <= 6, m
        assert not m["drift"]  # one bad window is no trend
        for line in m["first_mismatches"]:
            if f"{mode} call 0 " in line:
                assert "dispatch payload differs" in line or "expert_counts differs" in line, line
            elif f"{mode} call 10 " in line or f"{mode} graph replay 3 " in line:
                assert "combine relative error" in line, line
            else:
                raise AssertionError(f"a mismatch where nothing was corrupted: {line}")
    assert soak().render(doc).endswith("FAIL")


@pytest.mark.slow  # three fresh processes import torch: ~10 s on 2 idle cores
def test_soak_command_line_exit_status(tmp_path: Path) -> None:
    """Standalone on 2 spawned CPU processes: the table on stdout, the JSON, exit status 1 on a
    mismatch."""
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--nprocs", "2", *TINY, "--self-test-corrupt"]
    proc = run_cpu_process([*cmd, "--json", str(out)], tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ncclep soak: 2x CPU" in proc.stdout and "mismatch: ll call 0 rank" in proc.stdout
    assert proc.stdout.rstrip().endswith("FAIL")
    doc = json.loads(out.read_text())
    assert not doc["passed"] and doc["meta"]["self_test_corrupt"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--check-every", "0"],
        ["--ll-iters", "-1"],
        ["--ht-hidden", "200"],
        ["--window", "0"],
        ["--nprocs", "0"],
    ],
)
def test_soak_argument_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        soak().parse_args(argv)


def _ll_output(counts: list[int]) -> ncclep.LLDispatchOutput:
    g = torch.Generator().manual_seed(0)
    experts, rows, hidden, ranks, slots, k = len(counts), 6, 256, 2, 3, 4
    return ncclep.LLDispatchOutput(
        torch.randn(experts, rows, hidden, generator=g).to(torch.bfloat16),
        None,
        torch.tensor(counts, dtype=torch.int32),
        LLHandle(
            send_slots=torch.zeros(slots, ranks, dtype=torch.int32),
            recv_rows=torch.zeros(ranks, slots, k, dtype=torch.int32),
            recv_weights=torch.zeros(ranks, slots, k),
            recv_slot_counts=torch.zeros(ranks, dtype=torch.int32),
        ),
    )


def test_ll_comparison_looks_at_rows_in_use_only() -> None:
    compare = ncclep_testing.ll_dispatch_difference
    b = _ll_output([2, 0, 6])
    a = b._replace(x=b.x.clone())
    assert compare(a, b) is None
    a.x[0, 2:] = float("nan")  # padding: past expert 0's 2 rows, and all of expert 1
    a.x[1] = 7.0
    assert compare(a, b) is None
    a.x[2, 5, 100] += 1  # expert 2's last row
    assert compare(a, b) == "dispatch payload differs on rows in use"
    assert "expert_counts" in compare(b._replace(expert_counts=torch.tensor([2, 1, 6])), b)
    handle = LLHandle(**{**b.handle.__dict__, "recv_slot_counts": torch.ones(2, dtype=torch.int32)})
    assert compare(b._replace(handle=handle), b) == "handle.recv_slot_counts differs"


def test_ht_comparison_looks_at_rows_in_use_only() -> None:
    compare = ncclep_testing.ht_dispatch_difference
    rows, hidden, k = 5, 128, 2
    x, scales = ncclep.fp8.quantize(torch.randn(rows, hidden))
    recv_slot = torch.tensor([0, 1, -1, 2, -1], dtype=torch.int32)
    idx = torch.zeros(rows, k, dtype=torch.int32)
    b = ncclep.HTDispatchOutput(
        x,
        scales,
        idx,
        torch.rand(rows, k),
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([3, 1], dtype=torch.int32),
        HTHandle(
            torch.zeros(3, 2, dtype=torch.int32), recv_slot, torch.tensor([2, 1], dtype=torch.int32), idx
        ),
    )
    a = b._replace(x=b.x.clone(), scales=b.scales.clone())
    a.x.view(torch.uint8)[2] ^= 0x11  # unused rows
    a.scales[4] = 0
    assert compare(a, b) is None
    a.scales[3, 0] *= 2
    assert compare(a, b) == "dispatch scales differ on rows in use"
    assert compare(b._replace(topk_weights=None), b) == "topk_weights presence differs"
    assert compare(b._replace(num_recv=torch.tensor([4], dtype=torch.int32)), b) == "num_recv differs"


def test_drift_rule() -> None:
    drift = soak().drift
    assert drift([1e-3] * 10)[0] is False
    assert drift([0.0] * 10)[0] is False
    assert drift([2e-3] * 9 + [9e-3])[0] is False  # one bad window is no trend
    assert drift([1e-3] * 5 + [3e-3] * 5)[0] is True
    assert drift([0.0] * 5 + [5e-4] * 5)[0] is False  # below the floor
    assert drift([1e-3])[0] is False
