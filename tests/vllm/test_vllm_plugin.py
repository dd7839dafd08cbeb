"""The entry point: vLLM's own plugin loader finds ncclep, which swaps the DeepEP classes only with
VLLM_NCCLEP=1. Each case runs in a fresh interpreter (the swap is process-wide).

Needs vLLM (see scripts/test_vllm.sh); skipped where ``import vllm`` fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

# Not plain "vllm": with tests/ on sys.path, this very folder would import as a namespace package.
pytest.importorskip(
    "vllm.model_executor.layers.fused_moe",
    reason="vLLM is not installed: run scripts/test_vllm.sh (separate venv)",
)

PROBE = r"""
import json, logging, io
handler_stream = io.StringIO()
from vllm.plugins import load_general_plugins
import vllm.logger
logging.getLogger("vllm").addHandler(logging.StreamHandler(handler_stream))
logging.getLogger("vllm").setLevel(logging.INFO)
load_general_plugins()
from vllm.distributed.device_communicators import all2all
from vllm.model_executor.layers.fused_moe import all2all_utils
# What CudaCommunicator's lazy `from .all2all import ...` now finds.
from vllm.distributed.device_communicators.all2all import DeepEPHTAll2AllManager, DeepEPLLAll2AllManager
def name(obj):
    return None if obj is None else f"{obj.__module__}.{obj.__qualname__}"
print(json.dumps({
    "ll_manager": name(DeepEPLLAll2AllManager),
    "ht_manager": name(DeepEPHTAll2AllManager),
    "ll_pf": name(getattr(all2all_utils, "DeepEPLLPrepareAndFinalize", None)),
    "ht_pf": name(getattr(all2all_utils, "DeepEPHTPrepareAndFinalize", None)),
    "block": getattr(all2all_utils, "DEEPEP_QUANT_BLOCK_SHAPE", None),
    "log": handler_stream.getvalue(),
}))
"""


def probe(flag: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_NCCLEP", "VLLM_PLUGINS")}
    if flag is not None:
        env["VLLM_NCCLEP"] = flag
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_entry_point_is_registered():
    found = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "ncclep"]
    assert found, "no 'ncclep' vllm.general_plugins entry point: pip install -e . in this environment"
    assert found[0].value == "ncclep.vllm:register"


def test_plugin_swaps_classes_with_flag():
    got = probe("1")
    assert got["ll_manager"] == "ncclep.vllm.all2all.NcclepLLAll2AllManager"
    assert got["ht_manager"] == "ncclep.vllm.all2all.NcclepHTAll2AllManager"
    assert got["ll_pf"] == "ncclep.vllm.prepare_finalize.NcclepLLPrepareAndFinalize"
    assert got["ht_pf"] == "ncclep.vllm.prepare_finalize.NcclepHTPrepareAndFinalize"
    assert got["block"] == [128, 128]
    assert "deepep_low_latency" in got["log"] and "ncclep LL" in got["log"], got["log"]


@pytest.mark.parametrize("flag", [None, "0"])
def test_plugin_does_nothing_without_flag(flag):
    got = probe(flag)
    assert got["ll_manager"] == "vllm.distributed.device_communicators.all2all.DeepEPLLAll2AllManager"
    assert got["ht_manager"] == "vllm.distributed.device_communicators.all2all.DeepEPHTAll2AllManager"
    # Without DeepEP installed vLLM never defines these; with it they stay vLLM's.
    for key in ("ll_pf", "ht_pf"):
        assert got[key] is None or got[key].startswith("vllm."), got[key]
    assert "ncclep" not in got["log"]
