"""Files shipped inside the package (setup.py's ``package_data``): the YAML configs (``sfd_scale/configs``) and
the SLURM batch scripts (``sfd_scale/slurm``). In a checkout both are links to the top-level ``configs/`` and
``slurm/`` folders, so the paths known from a checkout keep working there; a built wheel carries copies, so an
installed ``sfd`` finds them from any directory (``--config experiments/sfd_xl``, ``sfd slurm-script``)."""
from __future__ import annotations

from pathlib import Path
from typing import List

PACKAGE = Path(__file__).parent
CONFIGS = PACKAGE / "configs"
SLURM = PACKAGE / "slurm"
YAML_SUFFIXES = (".yaml", ".yml")


def shipped_config_candidates(name: str) -> List[Path]:
    """Where a shipped config called ``name`` would be: its path under ``configs/`` (a leading ``configs/`` is
    dropped, so a checkout's ``configs/demo/digits.yaml`` names the same file), with ``.yaml`` added when
    ``name`` has no YAML suffix."""
    rel = Path(name)
    if rel.is_absolute():
        return []
    parts = [p for p in rel.parts if p != "."]
    if parts[:1] == ["configs"]:
        parts = parts[1:]
    if not parts or ".." in parts:
        return []
    path = CONFIGS.joinpath(*parts)
    return [path] if path.suffix in YAML_SUFFIXES else [path.with_name(path.name + ".yaml"), path]


def shipped_configs() -> List[str]:
    """The shipped configs by the names ``--config`` takes (``demo/digits``, ``experiments/sfd_xl``, ...)."""
    return sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in CONFIGS.rglob("*.yaml"))


def slurm_scripts() -> List[str]:
    """The shipped batch scripts (``train.sbatch``, ...) and the shell functions they source (``common.sh``)."""
    return sorted(p.name for p in SLURM.iterdir() if p.suffix in (".sbatch", ".sh"))
