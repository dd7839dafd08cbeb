"""examples/quickstart.py, the script the docs' first steps run, under torchrun on 2 CPU processes."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT, TORCHRUN, run_cpu_process


def test_quickstart_runs_under_torchrun(tmp_path: Path) -> None:
    proc = run_cpu_process([*TORCHRUN, str(ROOT / "examples" / "quickstart.py")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "LL: ncclep.Group(" in proc.stdout and "HT: ncclep.Group(" in proc.stdout, proc.stdout
    assert proc.stdout.count("combine ok") == 2, proc.stdout
