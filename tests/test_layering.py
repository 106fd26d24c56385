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


def test_the_contract_catches_an_upward_import_and_a_cycle(tmp_path):
    """The contract is not vacuous: a copy of the package with one import from a higher layer (models ->
    train) and one circle between siblings (train.official_step <-> train.benchmark) breaks both rules,
    each report naming the offending import."""
    shutil.copytree(ROOT / "sfd_scale", tmp_path / "sfd_scale", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "sfd_scale" / "models" / "flops.py", "a") as f:
        f.write("\nfrom ..train import ema  # an upward import\n")
    with open(tmp_path / "sfd_scale" / "train" / "official_step.py", "a") as f:
        f.write("\nfrom .benchmark import sweep  # benchmark imports official_step: a cycle\n")
    result = lint(tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    assert "sfd_scale.models.flops -> sfd_scale.train.ema" in report, report
    assert ".official_step -> .benchmark" in report, report
