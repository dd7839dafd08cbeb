"""examples/quickstart.py, the script the docs' first steps run, under torchrun on 2 CPU processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, cpu_process_env


def test_quickstart_runs_under_torchrun(tmp_path: Path) -> None:
    env = cpu_process_env()
    # torchrun as this interpreter's module: no activated virtual environment needed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(ROOT / "examples" / "quickstart.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "LL: ncclep.Group(" in proc.stdout and "HT: ncclep.Group(" in proc.stdout, proc.stdout
    assert proc.stdout.count("combine ok") == 2, proc.stdout
