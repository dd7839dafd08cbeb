"""The benchmark's outputs: a table on stdout, JSON, and an optional PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runner import Row

COLUMNS = (
    ("mode", 4),
    ("op", 8),
    ("dtype", 5),
    ("routing", 7),
    ("tokens", 6),
    ("hidden", 6),
    ("topk", 4),
    ("backend", 9),
    ("median us", 10),
    ("p90 us", 10),
    ("GB/s", 8),
    ("NVL GB/s", 8),
    ("graph us", 9),
    ("vs ref", 6),
    ("buffer MB", 9),
    ("SMs", 4),
    ("check", 8),
)


def _rate(gbps: float) -> str:
    return f"{gbps:.1f}" if gbps >= 10 else f"{gbps:.3g}"


def _reference_median(rows: list[Row], row: Row) -> float | None:
    for other in rows:
        if other.backend == "reference" and other.op == row.op and other.case == row.case:
            return other.median_us
    return None


def table(rows: list[Row]) -> str:
    header = "  ".join(name.rjust(width) for name, width in COLUMNS)
    lines = [header, "-" * len(header)]
    for r in rows:
        c = r.case
        ref = _reference_median(rows, r)
        speedup = "" if ref is None or r.backend == "reference" else f"{ref / r.median_us:.1f}x"
        cells = (
            c["mode"],
            r.op,
            c["dtype"] if r.op == "dispatch" else "bf16",
            c["routing"],
            c["tokens"],
            c["hidden"],
            c["topk"],
            r.backend,
            f"{r.median_us:.1f}",
            f"{r.p90_us:.1f}",
            _rate(r.gbps),
            _rate(r.nvl_gbps),
            "-" if r.graph_median_us is None else f"{r.graph_median_us:.1f}",
            speedup,
            f"{r.buffer_bytes / 2**20:.0f}",
            "-" if r.sms is None else r.sms,
            r.validated.split(":")[0],
        )
        lines.append("  ".join(str(v).rjust(w) for v, (_, w) in zip(cells, COLUMNS, strict=True)))
    return "\n".join(lines)


def to_json(rows: list[Row], meta: dict[str, Any], path: Path) -> None:
    records = []
    for r in rows:
        record = dict(vars(r))
        record["gbps"] = r.gbps
        record["nvl_gbps"] = r.nvl_gbps
        records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": records}, indent=2))


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Latency and bandwidth against tokens per rank, a line per (mode, op, dtype, backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, ...], list[Row]] = {}
    for r in rows:
        c = r.case
        key = (c["mode"], r.op, c["dtype"], r.backend, c["routing"], str(c["hidden"]), str(c["topk"]))
        series.setdefault(key, []).append(r)
    fig, (lat, bw) = plt.subplots(1, 2, figsize=(13, 5))
    for key, members in sorted(series.items()):
        members.sort(key=lambda r: r.case["tokens"])
        tokens = [r.case["tokens"] for r in members]
        mode, op, dtype, backend = key[:4]
        label = (
            f"{mode} {op} {dtype} {backend}" if op == "dispatch" else f"{mode} {op} (after {dtype}) {backend}"
        )
        style = "--" if key[3] == "reference" else "-"
        lat.plot(tokens, [r.median_us for r in members], style, marker="o", label=label)
        bw.plot(tokens, [r.gbps for r in members], style, marker="o", label=label)
    for ax, ylabel in ((lat, "median latency (us)"), (bw, "bandwidth (GB/s, BENCHMARKS.md bytes)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    lat.set_yscale("log")
    if lat.get_legend_handles_labels()[0]:
        lat.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
