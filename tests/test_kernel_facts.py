"""The C library's kernel facts on a machine without a GPU: which groups the kernels serve (multi-node
HT included, nLsaTeams > 1 faked at the C boundary), the HT output sizes against the pure-Python
install's copy, and the limits. Builds tests/c/kernel_facts_main.cc with the host compiler."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ncclep.config import LAYOUT_IDS, MODE_IDS, GroupConfig, ht_num_rows_python
from ncclep.errors import REJECT_REASONS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "tests/c/kernel_facts_main.cc",
    *(f"csrc/core/{n}.cc" for n in ("kernel_facts", "config", "last_error", "reject_reasons")),
]


def _cuda_include() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cxx, cuda = shutil.which("g++") or shutil.which("c++"), _cuda_include()
    if cxx is None or cuda is None:
        why = "needs a C++ compiler and the CUDA headers (ncclep.h includes cuda_runtime_api.h)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI machines have both: this check must run there
        pytest.skip(why)
    exe = tmp_path_factory.mktemp("facts") / "kernel_facts"
    cmd = [cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc'}", f"-I{cuda}"]
    subprocess.run([*cmd, *(str(ROOT / s) for s in SOURCES), "-o", str(exe)], check=True)

    def ask(*queries: str) -> list[str]:
        done = subprocess.run([str(exe)], input="\n".join(queries) + "\n", capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    return ask


def support(mode: str, ranks: int, teams: int = 1, gin: int = 0, api: int = 1, **sizes: int) -> str:
    s = dict(experts=256, tokens=4096 if mode == "ht" else 128, hidden=7168, topk=8) | sizes
    sizes_text = f"{s['experts']} {s['tokens']} {s['hidden']} {s['topk']}"
    return f"support {MODE_IDS[mode]} {sizes_text} {ranks} {teams} {gin} {api}"


def test_multinode_ht_is_served_by_the_kernels(facts) -> None:  # type: ignore[no-untyped-def]
    # 2 nodes of 8 and 4 of 4 with GIN: the hierarchical HT kernels serve them (no fallback)
    assert facts(support("ht", 16, teams=2, gin=1), support("ht", 16, teams=4, gin=1)) == ["ok 1 ", "ok 1 "]
    assert facts(support("ll", 16, teams=2, gin=1)) == ["ok 1 "]


@pytest.mark.parametrize(
    "query,reason",
    [
        (support("ht", 16, teams=2, gin=0), "peers off the NVLink (LSA) team need GIN"),
        (support("ll", 8, teams=2, gin=0), "peers off the NVLink (LSA) team need GIN"),
        (support("ht", 4, api=0), "the NCCL device API is unavailable"),
        (support("ht", 64, experts=256), "the HT kernels take at most 32 ranks, got 64"),
        (support("ht", 2, experts=8192), "the HT kernels take at most 4096 experts"),
        (support("ht", 4, topk=33, experts=64), "the HT kernels take max_topk <= 32, got 33"),
        (support("ll", 4, topk=17), "the LL kernels take max_topk <= 16, got 17"),
        (support("ll", 4, tokens=4096, topk=8), "max_tokens_per_rank * max_topk <= 16384, got 4096 * 8"),
        (support("ll", 256), "the LL kernels take at most 128 ranks, got 256"),
    ],
)
def test_refusals_name_the_limit(facts, query: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    (answer,) = facts(query)
    assert answer.startswith("ok 0 ") and reason in answer, answer


def test_bad_config_is_an_error_not_a_refusal(facts) -> None:  # type: ignore[no-untyped-def]
    (answer,) = facts(support("ht", 3))  # 256 experts over 3 ranks
    assert answer.startswith("error 1 ") and "multiple of nRanks" in answer


def test_ht_rows_match_the_python_copy(facts) -> None:  # type: ignore[no-untyped-def]
    cases = []
    for ranks, topk, k, layout, alignment in itertools.product(
        (1, 2, 4, 8), (1, 8, 16), (1, 3, 8), ("flat", "expert_major"), (1, 16, 128)
    ):
        if k > topk or (layout == "flat" and alignment != 1):
            continue
        cfg = GroupConfig(
            num_experts=64, max_tokens_per_rank=96, hidden=256, mode="ht", world_size=ranks, max_topk=topk
        )
        cases.append((cfg, k, layout, alignment))
    answers = facts(
        *(
            f"rows 64 96 256 {cfg.max_topk} {cfg.world_size} {k} {LAYOUT_IDS[layout]} {alignment}"
            for cfg, k, layout, alignment in cases
        )
    )
    for (cfg, k, layout, alignment), answer in zip(cases, answers, strict=True):
        assert answer == f"ok {ht_num_rows_python(cfg, k, layout, alignment)}", (cfg, k, layout, alignment)


def test_limits(facts) -> None:  # type: ignore[no-untyped-def]
    (answer,) = facts("limits")
    fields = dict(item.split("=") for item in answer.split()[1:])
    assert fields["ll_max_topk"] == "16" and fields["ht_max_ranks"] == "32" and fields["fp8_block"] == "128"


def test_reject_reasons_match_the_python_copy(facts) -> None:  # type: ignore[no-untyped-def]
    (answer,) = facts("rejects")
    status, *names = answer.split()
    assert status == "ok" and names[0] == "none" and names[-1] == "unknown", answer
    assert {name: code for code, name in enumerate(names[1:-1], start=1)} == {
        name: code for name, (code, _) in REJECT_REASONS.items()
    }
