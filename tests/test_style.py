"""The lint rules of ruff.toml (line length 120, pyflakes, syntax errors) hold for the whole checkout. ruff
reads ruff.toml from the directory it checks; a failure prints ruff's report (file, line, rule)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_passes_ruff():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
