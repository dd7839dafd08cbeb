"""The benchmark's outputs, all drawn from one JSON document (``{"meta": ..., "rows": [...]}``):
the header and table on stdout, the JSON file, and an optional PNG plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .runner import Row

HEADLINE = ("kernel", "event", "host")  # the first figure a row has is its headline (GB/s, plot)
FIGURE_HELP = {
    "kernel": "device time of the op's kernels (torch profiler / CUPTI), summed per call",
    "event": "CUDA events around the eager call (perf_counter on CPU processes)",
    "graph": "CUDA events around the replay of the op (pair: dispatch+combine) captured in a CUDA graph",
    "host": "CPU time of the eager call (time.perf_counter) while the GPU is busy behind the sleep "
    "(reference backend on GPUs: its wall time from a drained queue, as it waits for the GPU)",
}
CPU_HOST_HELP = "wall time of the eager call (time.perf_counter)"
Record = dict[str, Any]


def record(row: Row) -> Record:
    """A row as it goes into the JSON: every figure as {median_us, p90_us, samples} or null, and
    the headline (:func:`with_headline`)."""
    return with_headline(asdict(row))


def with_headline(rec: Record) -> Record:
    """``rec`` with its headline figure added: ``figure`` (the first of kernel, event, host that
    it has), its ``median_us`` and ``p90_us``, and ``gbps``/``nvl_gbps`` from it."""
    out = dict(rec)
    figure = next((f for f in HEADLINE if out.get(f) is not None), None)
    timing = out[figure] if figure else None
    out["figure"] = figure
    out["median_us"] = timing["median_us"] if timing else None
    out["p90_us"] = timing["p90_us"] if timing else None
    rate = timing is not None and timing["median_us"] > 0
    out["gbps"] = out["bytes"] / timing["median_us"] / 1e3 if rate and timing else None
    out["nvl_gbps"] = out["nvl_bytes"] / timing["median_us"] / 1e3 if rate and timing else None
    return out


def document(rows: list[Row], meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "rows": [record(r) for r in rows]}


def write_json(doc: dict[str, Any], path: str | Path) -> str:
    """Write the document to ``path`` (``-``: stdout); returns the text written."""
    text = json.dumps(doc, indent=2)
    if str(path) == "-":
        print(text, flush=True)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


def read_json(path: str | Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "rows" not in doc or "meta" not in doc:
        raise ValueError(f"{path}: not a results file of python -m ncclep.bench")
    return doc


# ------------------------------------------------------------------------------------- header


def header(doc: dict[str, Any]) -> str:
    """What was measured, how, on what; and why the reference backend served a group."""
    meta, rows = doc["meta"], doc["rows"]
    s = meta.get("settings", {})
    nccl = f", NCCL {meta['nccl']}" if meta.get("nccl") else ""
    if meta.get("torch_nccl"):
        nccl += f" (torch built with {meta['torch_nccl']})"
    lines = [
        f"ncclep bench: {meta.get('world_size')}x {meta.get('device')}, torch {meta.get('torch')}{nccl}, "
        f"{meta.get('date')}"
    ]
    if meta.get("note"):
        lines.append(f"note: {meta['note']}")
    if not meta.get("gpu", True):
        start = "after dist.barrier (gloo)"
    elif s.get("queue_ahead", True):
        start = "after an all-ranks barrier (all-reduce on the stream) and a ~1 ms sleep kernel"
    else:
        start = "after an all-ranks barrier (all-reduce on the stream), the queue drained"
    lines.append(
        f"timing: slowest rank's median of {s.get('iters')} calls after {s.get('warmup')} warm-ups, "
        f"{s.get('sets')} input sets rotated; every step {start}"
    )
    if meta.get("gpu") and (s.get("iters", 50) < 50 or s.get("warmup", 20) < 20 or s.get("sets", 4) < 4):
        lines.append("  (fewer calls, warm-ups or input sets than the protocol's 50, 20 and 4)")
    for f in [f for f in ("kernel", "event", "graph", "host") if any(r.get(f) for r in rows)]:
        text = FIGURE_HELP[f] if meta.get("gpu", True) or f != "host" else CPU_HOST_HELP
        lines.append(f"  {f + ' us':<9} {text}")
    lines.append(
        "bytes (DeepEP's): LL valid selections x row (bf16 hidden*2, fp8 hidden+hidden/128*4+16); HT rows "
        "received incl. own rank (mean over ranks) x row (bf16 hidden*2, fp8 hidden*(1+4/128)); combine "
        "rows x hidden*2; NVL GB/s: the part to other ranks"
    )
    for b in meta.get("backends", []):
        if b.get("reason") is None and b.get("backend") == b.get("requested"):
            continue
        sms = f", {b['num_sms']} SMs" if b.get("num_sms") else ""
        served = b.get("backend") or "not run"
        lines.append(f"backend {b['requested']} ({b['mode']}{sms}): {served}: {b.get('reason') or '-'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- table


def _us(figure: str) -> Callable[[Record, list[Record]], str | None]:
    def cell(r: Record, _rows: list[Record]) -> str | None:
        t = r.get(figure)
        return None if t is None else f"{t['median_us']:.1f}"

    return cell


def _rate(key: str) -> Callable[[Record, list[Record]], str | None]:
    def cell(r: Record, _rows: list[Record]) -> str | None:
        v = r.get(key)
        if v is None:
            return None
        return f"{v:.1f}" if v >= 10 else f"{v:.3g}"

    return cell


def _same_op(a: Record, b: Record) -> bool:
    return a["op"] == b["op"] and a["case"] == b["case"]


def _vs_ref(r: Record, rows: list[Record]) -> str | None:
    """The reference's time over this row's, on the row's headline figure."""
    if r["backend"] == "reference" or not r.get("figure"):
        return None
    for ref in rows:
        if ref["backend"] == "reference" and _same_op(ref, r) and ref.get(r["figure"]):
            return f"{ref[r['figure']]['median_us'] / r[r['figure']]['median_us']:.1f}x"
    return None


def _check(r: Record, _rows: list[Record]) -> str | None:
    v = r.get("validated", "not asked")
    return None if v == "not asked" else v.split(":")[0]


COLUMNS: list[tuple[str, Callable[[Record, list[Record]], Any]]] = [
    ("mode", lambda r, _: r["case"]["mode"]),
    ("op", lambda r, _: r["op"]),
    ("payload", lambda r, _: r["case"]["dtype"]),
    ("routing", lambda r, _: r["case"]["routing"]),
    ("tokens", lambda r, _: r["case"]["tokens"]),
    ("hidden", lambda r, _: r["case"]["hidden"]),
    ("topk", lambda r, _: r["case"]["topk"]),
    ("backend", lambda r, _: r["backend"]),
    ("SMs", lambda r, _: r.get("sms")),
    ("kernel us", _us("kernel")),
    ("event us", _us("event")),
    ("graph us", _us("graph")),
    ("host us", _us("host")),
    ("p90 us", lambda r, _: None if r.get("p90_us") is None else f"{r['p90_us']:.1f}"),
    ("GB/s", _rate("gbps")),
    ("NVL GB/s", _rate("nvl_gbps")),
    ("vs ref", _vs_ref),
    ("buffer MB", lambda r, _: f"{r['buffer_bytes'] / 2**20:.0f}" if r.get("buffer_bytes") else None),
    ("check", _check),
]


def table(rows: list[Record]) -> str:
    """One line per row; only the columns that have a value in some row. GB/s, p90 and "vs ref"
    are of the headline figure (kernel, else event, else host)."""
    cells = [[fn(r, rows) for _, fn in COLUMNS] for r in rows]
    keep = [k for k in range(len(COLUMNS)) if any(c[k] is not None for c in cells)]
    names = [COLUMNS[k][0] for k in keep]
    text = [[("-" if c[k] is None else str(c[k])) for k in keep] for c in cells]
    widths = [max([len(n)] + [len(t[i]) for t in text]) for i, n in enumerate(names)]
    head = "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))
    lines = [head, "-" * len(head)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(t, widths, strict=True)) for t in text]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- plot


def plot(doc: dict[str, Any], path: str | Path) -> None:
    """Latency and bandwidth of each row's headline figure against tokens per rank: a row of two
    panels per mode, a line per (op, payload, backend, SMs, routing, hidden, top-k) (a colour per
    payload and backend, a line style per op), the legend beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = doc["meta"], [r for r in doc["rows"] if r.get("median_us")]
    modes = [m for m in ("ll", "ht") if any(r["case"]["mode"] == m for r in rows)] or ["ll"]
    fig, axes = plt.subplots(
        len(modes), 2, figsize=(15, 4.8 * len(modes)), squeeze=False, layout="constrained"
    )
    figures_used = sorted({r["figure"] for r in rows})
    for (lat, bw), mode in zip(axes, modes, strict=True):
        series: dict[tuple[Any, ...], list[Record]] = {}
        for r in rows:
            c = r["case"]
            if c["mode"] != mode:
                continue
            key = (r["op"], c["dtype"], r["backend"], r.get("sms") or 0, c["routing"], c["hidden"], c["topk"])
            series.setdefault(key, []).append(r)
        extra_shapes = len({k[4:] for k in series}) > 1
        families = sorted({k[1:] for k in series})  # a colour per (payload, backend, SMs, shape)
        for key, members in sorted(series.items()):
            members.sort(key=lambda r: r["case"]["tokens"])
            op, dtype, backend, sms = key[:4]
            label = f"{op} {dtype} {backend}" if op != "combine" else f"combine (after {dtype}) {backend}"
            if sms:
                label += f" {sms} SMs"
            if extra_shapes:
                label += f" {key[4]} h{key[5]} k{key[6]}"
            look = {
                "linestyle": {"dispatch": "-", "combine": "--", "pair": ":"}.get(op, "-"),
                "marker": "o" if backend != "reference" else "x",
                "color": f"C{families.index(key[1:]) % 10}",
                "label": label,
            }
            tokens = [r["case"]["tokens"] for r in members]
            lat.plot(tokens, [r["median_us"] for r in members], **look)
            bw.plot(tokens, [r["gbps"] or 0 for r in members], **look)
        ticks = sorted({r["case"]["tokens"] for r in rows if r["case"]["mode"] == mode})
        figure = "/".join(sorted({r["figure"] for r in rows if r["case"]["mode"] == mode})) or "-"
        lat.set_title(f"{mode.upper()}: latency ({figure} time)")
        bw.set_title(f"{mode.upper()}: bandwidth (DeepEP's bytes / {figure} time)")
        lat.set_ylabel("latency (µs)")
        bw.set_ylabel("bandwidth (GB/s)")
        for ax in (lat, bw):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("tokens per rank")
            ax.grid(True, which="major", alpha=0.3)
        lat.set_yscale("log")
        if bw.get_legend_handles_labels()[0]:
            bw.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(
        f"ncclep on {meta.get('world_size')}x {meta.get('device')} ({', '.join(figures_used) or 'no'} time; "
        f"{meta.get('date')})"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
