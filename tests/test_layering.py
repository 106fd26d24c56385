"""The layering contract (.importlinter): imports run one way between sfd_scale's packages and no package's
modules import each other in a circle. import-linter (grimp) reads the import graph of the checkout,
function-local imports included; a failure prints its report (which import breaks which rule)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / ".importlinter"


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the ``sfd_scale`` under ``root`` (it puts its working directory first on sys.path)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(CONTRACT)!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)


def test_imports_keep_the_layering_contract():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _broken_copy(tmp_path, name: str, module: str, line: str):
    """A copy of the package with ``line`` appended to ``module`` (a path under sfd_scale/), linted."""
    root = tmp_path / name
    shutil.copytree(ROOT / "sfd_scale", root / "sfd_scale", ignore=shutil.ignore_patterns("__pycache__"))
    with open(root / "sfd_scale" / module, "a") as f:
        f.write(f"\n{line}\n")
    result = lint(root)
    return result.returncode, result.stdout + result.stderr


def test_the_contract_catches_an_upward_import_and_a_cycle(tmp_path):
    """The contract is not vacuous: a copy of the package with one import from a higher layer (models ->
    train) breaks the layers, one with a circle between siblings (bench.official_step <-> bench.throughput)
    breaks the acyclic rule; each report names the offending import."""
    status, report = _broken_copy(tmp_path, "upward", "models/flops.py", "from ..train import ema  # upward")
    assert status != 0 and "sfd_scale.models.flops -> sfd_scale.train.ema" in report, report
    status, report = _broken_copy(tmp_path, "cycle", "bench/official_step.py",
                                  "from .throughput import sweep  # throughput imports official_step: a cycle")
    assert status != 0 and "No cycles are allowed in sfd_scale.bench" in report, report
    assert ".official_step -> .throughput" in report or ".throughput -> .official_step" in report, report
