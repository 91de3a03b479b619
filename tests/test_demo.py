"""``make demo`` (scripts/demo.py) runs: a real server, the packed, batch and
fractional paths, and the side-by-side table per digit. With the small
shipped ``tiny_cnn`` and few digits, to stay fast; ``make demo`` runs LeNet-1."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_the_three_paths(tmp_path):
    env = dict(os.environ, PYCRCNN_CONTEXT_DIR=str(tmp_path / "contexts"))
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--model", "tiny_cnn",
                          "--packed-digits", "2", "--batch-digits", "2"],
                         capture_output=True, text=True, timeout=900, env=env, cwd=str(REPO))
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "tiny_cnn, packed layout: 2 real MNIST test digits" in out
    table = out.split("== per digit, side by side", 1)[1]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"(packed|batch|fractional)\D.*?\s(\d+)\s+([\d.]+) s\s+([\d.]+) MB\s+(\d+) KB", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), float(m.group(3)), float(m.group(4)), int(m.group(5)))
    assert set(rows) == {"packed", "batch", "fractional"}, table
    assert rows["packed"][0] == 2 and rows["packed"][2] < rows["fractional"][2]  # upload per digit
