"""scripts/bench_ab.py, the A/B benchmark of two revisions, in its quick mode: HEAD against itself,
the small model in fp32. Each side must import the `mistral` of its own exported tree (the tool
checks it and stops otherwise), and every case must report a figure for both sides."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_ab_quick_runs_both_sides_interleaved(tmp_path):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: bench_ab.py exports revisions with git archive")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ab.py"), "HEAD", "HEAD", "--quick",
                          "--dtypes", "float32", "--cache", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d. ]+) \| ([\d. ]+) \|$", out.stdout, re.M)}
    assert set(rows) == {"decode small float32, compiled, tok/s", "serving small, 1 client, tok/s",
                         "serving small, 8 clients, tok/s"}, out.stdout
    for case, (old, new, ratio, old_rounds, new_rounds) in rows.items():
        assert float(old) > 0 and float(new) > 0, case
        assert float(ratio) == pytest.approx(float(new) / float(old), rel=0.02)  # the medians are printed rounded, case
        assert len(old_rounds.split()) == len(new_rounds.split()) == 2, case  # --quick: two rounds each
