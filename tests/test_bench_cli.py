"""The benchmark CLI: end to end at tiny sizes on CPU processes (standalone and under torchrun),
its argument checks, and the pure pieces (masking, bytes, medians, kernel-time aggregation,
table). A benchmark is not a timed test: nothing here asserts a speed."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LAUNCH_VARS, ROOT, TORCHRUN, run_cpu_process

from ncclep import _native
from ncclep.bench import cli, report, timing
from ncclep.bench.runner import Inputs, row_bytes, traffic
from ncclep.bench.workloads import Case, case_routing, mask_entries

TINY = ["--tokens", "16", "--hidden", "256", "--experts", "8", "--topk", "4", "--iters", "3", "--warmup", "1"]


def _check_results(data: dict[str, Any], modes: set[str]) -> None:
    assert data["meta"]["gpu"] is False and "no GPU" in data["meta"]["note"]
    rows = data["rows"]
    assert {r["case"]["mode"] for r in rows} == modes
    assert {r["op"] for r in rows} == {"dispatch", "combine", "pair"}
    for r in rows:
        assert r["backend"] == "reference"
        assert r["kernel"] is None and r["event"] is None and r["graph"] is None  # no GPU
        assert r["figure"] == "host" and r["host"]["samples"] >= 3
        assert r["median_us"] > 0 and r["p90_us"] >= r["median_us"]
        assert r["bytes"] > 0 and r["gbps"] > 0 and r["validated"] == "ok"


def _header_line(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    head = next(line for line in lines if line.lstrip().startswith("mode"))
    return head.split()


def test_standalone_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    proc = run_cpu_process(
        [sys.executable, "-m", "ncclep.bench", *TINY, "--validate", "--plot", "--out", str(out)], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no GPU found: running the reference backend" in proc.stderr
    assert "[1/" in proc.stderr  # progress lines
    assert "ncclep bench: 2x CPU" in proc.stdout and "host us" in proc.stdout
    # On CPU only the columns with data: no kernel, event or graph time, no SMs, no buffers.
    names = " ".join(_header_line(proc.stdout))
    for absent in ("kernel", "event", "graph", "SMs", "buffer"):
        assert absent not in names
    for present in ("host us", "GB/s", "check", "pair"):
        assert present in proc.stdout
    data = json.loads((out / "results.json").read_text())
    _check_results(data, {"ll", "ht"})
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same run's JSON drawn again, without running anything.
    again = tmp_path / "again.png"
    assert cli.main(["--replot", str(out / "results.json"), "--plot", str(again)]) == 0
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torchrun_json_to_stdout_and_one_token_moves_data(tmp_path: Path) -> None:
    """Under torchrun (its ranks, not spawned ones) with ``--json -``: stdout is the JSON alone
    (the table on stderr), and a 1-token top-8 LL batch keeps most of its entries: it moves bytes."""
    cmd = [*TORCHRUN, "-m", "ncclep.bench", "--mode", "ll", "--dtype", "fp8", "--tokens", "1,16"]
    cmd += ["--topk", "8", "--experts", "16", "--hidden", "256", "--iters", "3", "--warmup", "1"]
    cmd += ["--validate", "--json", "-"]
    proc = run_cpu_process(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert "host us" in proc.stderr  # the table went to stderr
    assert not (tmp_path / "bench_out").exists()
    assert data["meta"]["world_size"] == 2
    _check_results(data, {"ll"})
    one = {r["op"]: r for r in data["rows"] if r["case"]["tokens"] == 1}
    # 7 of 8 selections stay (10 % of 8 entries, rounded); fp8 rows of 256 + 8 scale + 16 bytes
    assert one["dispatch"]["bytes"] == 7 * (256 + 8 + 16)
    assert one["combine"]["bytes"] == 7 * 256 * 2
    assert one["pair"]["bytes"] == one["dispatch"]["bytes"] + one["combine"]["bytes"]


# ------------------------------------------------------------------------------ arguments


@pytest.fixture
def cpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI in this process sees no launcher and no GPU, as on a CPU machine, whatever the host."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_host_overhead_script_times_every_method(tmp_path: Path) -> None:
    """bench/host_overhead.py (the eager methods' Python, stub backend) runs and reports each method."""
    out = tmp_path / "host.json"
    script = str(ROOT / "bench" / "host_overhead.py")
    args = ["--iters", "5", "--rounds", "1", "--warmup", "1", "--json", str(out)]
    run = run_cpu_process([sys.executable, script, *args], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"ll_dispatch", "ll_combine", "ll_pair", "ht_dispatch", "ht_combine", "ht_pair"}
    assert all(r["calls"] == 5 and r["median_us"] > 0 for r in results.values())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nprocs", "3", "--experts", "16"], "num_experts (16) must be divisible by the world size (3)"),
        (["--nprocs", "0"], "--nprocs must be at least 1"),
        (["--topk", "20", "--experts", "16"], "top-k (20) exceeds the number of experts (16)"),
        (["--mode", "ll", "--hidden", "200"], "LL mode needs hidden divisible by 128"),
        (["--mode", "ht", "--dtype", "fp8", "--hidden", "200"], "fp8 payloads need hidden divisible by 128"),
        (["--routing", "hot", "--topk", "4", "--experts", "4"], "hot routing needs top-k (4)"),
        (["--tokens", "0,8"], "--tokens must be positive"),
        (["--iters", "0"], "--iters must be at least 1"),
        (["--sets", "0"], "--sets must be at least 1"),
        (["--mode", "ll", "--sms", "8"], "--sms sweeps the HT kernels' SMs: it needs --mode ht or all"),
        (["--backend", "reference", "--sms", "8,16"], "the reference backend has none"),
        (["--sms", "0,8"], "--sms must be positive integers"),
        (["--sms", "8,x"], "expected comma-separated integers"),
        (["--backend", "cuda"], "--backend cuda needs CUDA GPUs"),
    ],
)
def test_arguments_are_checked_against_each_other(
    argv: list[str], message: str, cpu_host: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_fail_before_spawning(
    cpu_host: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def spawn(*_args: object) -> int:
        raise AssertionError("spawned processes with bad arguments")

    monkeypatch.setattr(cli, "launch", spawn)
    with pytest.raises(SystemExit):
        cli.main(["--nprocs", "3", "--experts", "16"])
    assert "divisible by the world size" in capsys.readouterr().err

    # --plot without matplotlib: refused at once, saying what to install.
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    with pytest.raises(SystemExit):
        cli.main(["--plot"])
    assert "pip install 'ncclep[plot]'" in capsys.readouterr().err


def test_sms_sweep_arguments(cpu_host: None) -> None:
    assert cli.parse_args(["--mode", "ht", "--sms", "8,16,24"]).sms == [8, 16, 24]
    assert cli.parse_args(["--sms", "24"]).sms == [24]  # --mode all: the HT cases sweep
    assert cli.parse_args(["--mode", "ht"]).sms is None


# ------------------------------------------------------------------------------ pure pieces


def test_ll_masking_keeps_one_entry_per_token() -> None:
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(8).repeat(1, 1)
    w = torch.full((1, 8), 0.125)
    mask_entries(idx, w, 0.1, g)
    assert int((idx >= 0).sum()) == 7 and float(w.sum()) == pytest.approx(0.875)

    idx = torch.arange(4096 * 8).view(4096, 8) % 256
    w = torch.ones(4096, 8)
    mask_entries(idx, w, 0.1, g)
    masked = idx < 0
    assert int(masked.sum()) == round(0.1 * 4096 * 8)
    assert bool((~masked).any(dim=1).all())  # no token loses every entry
    assert bool((w[masked] == 0).all()) and bool((w[~masked] == 1).all())

    idx = torch.zeros(3, 1, dtype=torch.int64)
    mask_entries(idx, torch.ones(3, 1), 0.5, g)
    assert bool((idx == 0).all())  # top-1 keeps its only entry

    case = Case("ll", 1, 7168, 8, 256, "random", "fp8")
    idx, _ = case_routing(case, 4, torch.Generator().manual_seed(1))
    assert int((idx >= 0).sum()) == 7
    ht = Case("ht", 64, 7168, 8, 256, "uniform", "bf16")
    assert bool((case_routing(ht, 4, torch.Generator().manual_seed(1))[0] >= 0).all())


def test_bytes_as_deepep_counts_them() -> None:
    assert row_bytes(Case("ll", 1, 7168, 8, 256, "random", "bf16")) == 7168 * 2
    assert row_bytes(Case("ll", 1, 7168, 8, 256, "random", "fp8")) == 7168 + 7168 // 128 * 4 + 16
    assert row_bytes(Case("ht", 1, 7168, 8, 256, "uniform", "fp8")) == 7168 + 7168 // 128 * 4
    # 2 tokens on rank 0 of 2, 4 experts (2 per rank): token 0 -> experts 0, 3 (ranks 0, 1),
    # token 1 -> experts 2, -1 (rank 1)
    idx = torch.tensor([[0, 3], [2, -1]])
    inp = Inputs(torch.zeros(2, 128), None, idx, torch.ones(2, 2))
    ll = traffic(Case("ll", 2, 128, 2, 4, "random", "bf16"), [inp], 0, 2)
    assert ll["dispatch"] == 3 * 256 and ll["combine"] == 3 * 256  # valid selections
    assert ll["dispatch_nvl"] == 2 * 256  # (token, remote rank) messages
    ht = traffic(Case("ht", 2, 128, 2, 4, "uniform", "bf16"), [inp], 0, 2)
    assert ht["dispatch"] == 3 * 256 and ht["dispatch_nvl"] == 2 * 256  # rows incl. own rank
    with pytest.raises(ValueError, match="divisible by the world size"):
        traffic(Case("ll", 2, 128, 2, 4, "random", "bf16"), [inp], 0, 3)


def test_median_of_the_slowest_rank() -> None:
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_us, t.p90_us, t.samples) == (3.0, 5.0, 5)
    ranks = [timing.Timing(10.0, 12.0, 50), timing.Timing(14.0, 15.0, 50), timing.Timing(11.0, 30.0, 50)]
    assert timing.slowest_of(ranks) is ranks[1]  # the largest median, not the largest p90
    assert timing.slowest_of([ranks[0], None]) is None
    assert timing.slowest_of([]) is None


@dataclass
class FakeKernel:
    name: str
    duration: float
    device: int = 0


@dataclass
class FakeEvent:
    name: str
    kernels: list[FakeKernel] = field(default_factory=list)
    cpu_children: list[FakeEvent] = field(default_factory=list)
    device_type: Any = torch.autograd.DeviceType.CPU


def test_kernel_time_from_profiler_events() -> None:
    def step(i: int, dispatch_us: float) -> list[FakeEvent]:
        dispatch_op = FakeEvent(
            "ncclep::ll_dispatch",
            [FakeKernel("void ncclep::(anonymous namespace)::llDispatch<true>(ncclep::Args)", dispatch_us)],
            [FakeEvent("aten::zeros", [FakeKernel("Memset (Device)", 1.0)])],
        )
        dispatch = FakeEvent(
            timing.range_name(i, 0),
            # the range's own GPU-side annotation is not a kernel
            [FakeKernel(timing.range_name(i, 0), 999.0)],
            [dispatch_op],
        )
        combine = FakeEvent(timing.range_name(i, 1), [FakeKernel("void ncclep::llCombine(int)", 5.0)])
        return [dispatch, combine, dispatch_op, *dispatch_op.cpu_children]

    events = [
        # outside the ranges: the barrier's all-reduce and the sleep
        FakeEvent("c10d::allreduce_", [FakeKernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 50.0)]),
        FakeEvent("aten::_sleep", [FakeKernel("spin_kernel", 1000.0)]),
        FakeEvent("llDispatch", device_type=torch.autograd.DeviceType.CUDA),
        *step(1, 12.0),
        *step(0, 10.0),
        *step(2, 30.0),
    ]
    per_step = timing.kernel_times(events, 2)
    assert [s[0] for s in per_step] == [
        {"llDispatch<true>": d, "Memset (Device)": 1.0} for d in (10.0, 12.0, 30.0)
    ]
    assert all(s[1] == {"llCombine": 5.0} for s in per_step)
    measured = timing.summarize_kernels(per_step, 2)
    assert measured.phases[0].median_us == 13.0 and measured.phases[0].samples == 3
    assert measured.phases[1].median_us == 5.0
    assert measured.total.median_us == 18.0
    assert measured.kernels[0] == {"Memset (Device)": 1.0, "llDispatch<true>": 12.0}
    with pytest.raises(ValueError, match="lacks a phase"):
        timing.kernel_times([e for e in events if e.name != timing.range_name(2, 1)], 2)


def test_phase_ranges_in_a_real_profile() -> None:
    """The ranges the kernel clock opens are found in a real torch profile (CPU only: no kernels)."""
    x = torch.ones(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(3):
            marks = timing._RangeMarks(i, 2)
            marks()
            y = x @ x
            marks()
            (y + 1).sum()
            marks()
            marks.close()
            assert marks.count == 3
    per_step = timing.kernel_times(prof.events(), 2)
    assert len(per_step) == 3 and all(p == [{}, {}] for p in per_step)


def _record(op: str, backend: str, sms: int | None, **figures: Any) -> dict[str, Any]:
    case = {"mode": "ht", "tokens": 4096, "hidden": 7168, "topk": 8, "experts": 256}
    case |= {"routing": "uniform", "dtype": "bf16"}
    row = {"case": case, "op": op, "backend": backend, "sms": sms, "validated": "not asked"}
    row |= {"buffer_bytes": 0, "bytes": 1e8, "nvl_bytes": 7e7, "kernels": {}}
    for f in ("kernel", "event", "graph", "host"):
        us = figures.get(f)
        row[f] = None if us is None else {"median_us": us, "p90_us": us * 1.1, "samples": 50}
    return row


def test_table_shows_only_columns_with_data() -> None:
    rows = [_record("dispatch", "reference", None, host=900.0)]
    names = _header_line(report.table(rows))
    assert "kernel" not in names and "SMs" not in names and "check" not in names and "host" in names

    # an SM sweep on GPUs: a row per SM count, labelled; vs ref on the kernel figure
    rows = [_record("dispatch", "cuda", n, kernel=1e4 / n, event=1e4 / n + 5, host=80.0) for n in (8, 16, 24)]
    rows.append(_record("dispatch", "reference", None, kernel=3000.0, event=3100.0, host=3300.0))
    for r in rows:
        r["buffer_bytes"] = 2**28 if r["backend"] == "cuda" else 0
    doc = {"meta": {"gpu": True, "settings": {}}, "rows": [report.with_headline(r) for r in rows]}
    text = report.table(doc["rows"])
    first = ["mode", "op", "payload", "routing", "tokens", "hidden", "topk", "backend", "SMs", "kernel"]
    assert _header_line(text)[:10] == first
    lines = text.splitlines()[2:]
    assert [line.split()[8] for line in lines[:3]] == ["8", "16", "24"]
    assert lines[0].split()[-2:] == ["2.4x", "256"]  # vs ref 3000 / 1250, buffer MB
    assert "graph" not in text


def test_header_names_the_nccl_the_kernels_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """An LD_PRELOAD-ed NCCL changes what ncclep loads, not torch.cuda.nccl.version() (the NCCL
    torch was built with): the header names the loaded one, and torch's beside it when they differ."""

    class Extension:
        code = 23007

        def nccl_version(self) -> int:
            return self.code

    ext = Extension()
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 28, 9))
    monkeypatch.setattr(_native, "_C", ext)
    meta = _native.nccl_versions()
    assert meta == {"nccl": "2.30.7", "torch_nccl": "2.28.9"}
    doc = {"meta": {"gpu": True, "settings": {}, "world_size": 4, **meta}, "rows": []}
    assert "NCCL 2.30.7 (torch built with 2.28.9)," in report.header(doc)

    ext.code = 22809
    meta = _native.nccl_versions()
    assert meta == {"nccl": "2.28.9", "torch_nccl": None}
    assert "NCCL 2.28.9," in report.header({"meta": {"gpu": True, "settings": {}, **meta}, "rows": []})

    monkeypatch.setattr(_native, "_C", None)  # a pure-Python install: torch's is all there is
    assert _native.nccl_versions() == {"nccl": "2.28.9"}


# ------------------------------------------------------------------------------ GPUs


@pytest.mark.gpu
def test_gpu_figures(tmp_path: Path) -> None:
    """On 2 GPUs: every figure of every row (kernel, event, host; graphs for the CUDA rows, the LL
    pair in one graph), the SM sweep's rows, per-kernel times, validation. Not a speed test."""
    import ncclep

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    if not ncclep.cuda_extension_available():
        pytest.skip("needs the ncclep CUDA extension")
    out = tmp_path / "results.json"
    base = [sys.executable, "-m", "ncclep.bench", "--nprocs", "2", "--iters", "5", "--warmup", "2"]
    base += ["--sets", "2", "--validate", "--dtype", "fp8"]
    for extra in (["--mode", "ll", "--tokens", "1,32"], ["--mode", "ht", "--tokens", "256", "--sms", "8,16"]):
        proc = run_cpu_process([*base, *extra, "--json", str(out)], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = json.loads(out.read_text())
        assert data["meta"]["gpu"] is True
        rows = data["rows"]
        assert {r["backend"] for r in rows} == {"cuda", "reference"}
        for r in rows:
            assert r["validated"] == "ok", r
            assert r["figure"] == "kernel" and r["kernel"]["median_us"] > 0, r
            assert r["event"]["median_us"] > 0 and r["host"]["median_us"] > 0, r
            assert r["kernels"] and r["bytes"] > 0
            cuda, ll = r["backend"] == "cuda", r["case"]["mode"] == "ll"
            assert (r["graph"] is not None) == (cuda and (ll or r["op"] != "pair")), r
        if extra[1] == "ht":
            assert {r["sms"] for r in rows if r["backend"] == "cuda"} == {8, 16}
