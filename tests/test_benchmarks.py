"""The foundation benchmark runs on small inputs and every implementation passes its validator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_foundation_benchmark_quick_run_validates(tmp_path):
    out = tmp_path / "foundation.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_foundation.py"),
                             "--quick", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    document = json.loads(out.read_text())
    assert document["benchmarks"], "no benchmark ran"
