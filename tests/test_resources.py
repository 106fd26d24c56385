"""Configs and SLURM scripts shipped with the package (``sfd_scale/resources.py``, issue #18): ``--config`` takes a
path or a shipped config by name from any directory, a path that exists wins, ``includes`` resolve inside the
package, and a missing name is one ConfigError listing where it looked."""
from __future__ import annotations

from pathlib import Path

import pytest

from sfd_scale import resources
from sfd_scale.config import ConfigError, find_config_file, load_config
from sfd_scale.study import load_study

REPO = Path(__file__).resolve().parents[1]


def test_the_package_ships_the_checkouts_configs_and_scripts():
    shipped = resources.shipped_configs()
    want = sorted(str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").rglob("*.yaml"))
    assert shipped == want and "demo/digits" in shipped and "experiments/sfd_xl" in shipped
    scripts = {p.name for p in (REPO / "slurm").iterdir()}
    assert set(resources.slurm_scripts()) == scripts >= {"train.sbatch", "common.sh"}


def test_a_name_resolves_to_the_shipped_file_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    digits = (resources.CONFIGS / "demo" / "digits.yaml").resolve()
    for name in ("demo/digits", "demo/digits.yaml", "configs/demo/digits.yaml", "./configs/demo/digits"):
        assert find_config_file(name).resolve() == digits, name
    # includes (../model/sfd_xl.yaml, imagenet256.yaml) resolve inside the package
    cfg = load_config(["experiments/sfd_xl"], ["data.path=/data/x"])
    assert cfg.model.name == "LightningDiT-XL/1" and cfg.data.path == "/data/x"


def test_a_path_that_exists_wins_and_own_configs_include_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "digits.yaml").write_text("includes: [experiments/sfd_xl]\ntrain: {max_steps: 7}\n")
    assert find_config_file("demo/digits.yaml") == Path("demo/digits.yaml")
    cfg = load_config(["demo/digits.yaml"], ["data.path=/data/x"])  # the local file, on a shipped base
    assert cfg.train.max_steps == 7 and cfg.model.name == "LightningDiT-XL/1"
    assert load_config(["demo/digits"]).train.max_steps == 1500  # no such path: the shipped demo


def test_a_missing_name_is_one_line_listing_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(["experiments/sfd_xll"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("config file not found: experiments/sfd_xll (looked for ")
    assert str(resources.CONFIGS / "experiments" / "sfd_xll.yaml") in message and "sfd configs" in message
    with pytest.raises(ConfigError, match="not found: /nowhere/x.yaml"):  # an absolute path is only that path
        find_config_file("/nowhere/x.yaml")


def test_a_shipped_study_and_its_base_configs_load_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = load_study("studies/digits_cpu")
    assert study.name == "digits_cpu"
    assert study.configs == [str((resources.CONFIGS / "demo" / "digits.yaml").resolve())]
