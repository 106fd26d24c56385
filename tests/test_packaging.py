"""What ``pip install`` pulls (setup.py, issue #18): the base install trains on the plain / megatron engines and
pulls neither DeepSpeed nor DALI; the extras name them; ``[test]`` still brings what the DeepSpeed-engine and
extraction tests need; megatron-core is capped below the release that may change the internals we use. When an
optional package is missing, the command that needs it says in one line (exit status 2) which extra to install."""
import runpy
import sys
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement

from sfd_scale.config import ConfigError, load_config, require_package
from sfd_scale.data.extract import DALI_MISSING

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo" / "digits.yaml")
TINY_EXTRACT = str(REPO / "configs" / "extract" / "tiny_cpu.yaml")


# ----------------------------------------------------------------------------------------------- setup.py
@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    """The keyword arguments setup.py hands to ``setuptools.setup`` (run with ``setup`` captured, nothing built)."""
    captured = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
        mp.chdir(REPO)  # setup.py reads README.md from the checkout
        runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    return captured


def _names(requirements) -> dict:
    return {Requirement(r).name.lower(): Requirement(r) for r in requirements}


def test_the_base_install_pulls_neither_deepspeed_nor_dali(setup_kwargs):
    base = _names(setup_kwargs["install_requires"])
    assert "megatron-core" in base and "torch" in base
    assert not [name for name in base if name == "deepspeed" or name.startswith("nvidia-dali")]


def test_the_extras_name_deepspeed_dali_per_cuda_version_and_gpu_kernels(setup_kwargs):
    extras = {name: _names(reqs) for name, reqs in setup_kwargs["extras_require"].items()}
    assert set(extras) >= {"deepspeed", "extract-cu12", "extract-cu13", "gpu", "test"}
    assert list(extras["deepspeed"]) == ["deepspeed"]
    assert list(extras["extract-cu12"]) == ["nvidia-dali-cuda120"]
    assert list(extras["extract-cu13"]) == ["nvidia-dali-cuda130"]
    assert "flash-attn" in extras["gpu"]
    # the README's one test command installs [test] only: the DeepSpeed-engine and extraction tests run from it
    assert {"pytest", "deepspeed", "nvidia-dali-cuda130"} <= set(extras["test"])


def test_megatron_core_has_an_upper_bound(setup_kwargs):
    megatron = _names(setup_kwargs["install_requires"])["megatron-core"]
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in megatron.specifier), str(megatron)
    from importlib.metadata import version
    assert megatron.specifier.contains(version("megatron-core")), "the tested megatron-core is outside the pin"


# ----------------------------------------------------------------------------------------------- a missing extra
def test_require_package_finds_without_importing_and_names_what_to_install(monkeypatch):
    require_package("json", "unused")  # installed: nothing raised
    with pytest.raises(ConfigError, match=r"^needs x: pip install 'sfd_scale\[x\]'$"):
        require_package("no_such_package_sfd.sub", "needs x: pip install 'sfd_scale[x]'")  # parent missing too
    monkeypatch.setitem(sys.modules, "json", None)  # how an uninstalled package looks to find_spec
    with pytest.raises(ConfigError):
        require_package("json", "json missing")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_training_on_deepspeed_without_it_names_the_extra(monkeypatch, tmp_path, capsys):
    from sfd_scale.train import trainer
    from tools import train

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    # checked before the data and the model are built (seconds to minutes at scale)
    monkeypatch.setattr(trainer, "build_training_data", lambda cfg: pytest.fail("data built before the check"))
    out = tmp_path / "run"
    assert train.main(["--config", DEMO, "parallel.engine=deepspeed", f"train.output_dir={out}"]) == 2
    assert _one_line(capsys) == "error: parallel.engine=deepspeed needs DeepSpeed: pip install 'sfd_scale[deepspeed]'"
    assert not out.exists()


def test_the_engine_factory_and_the_converter_check_too(monkeypatch, tmp_path):
    from sfd_scale.parallel.engines import build_engine
    from sfd_scale.train.convert import deepspeed_to_native

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    cfg = load_config([DEMO], ["parallel.engine=deepspeed"])
    with pytest.raises(ConfigError, match=r"pip install 'sfd_scale\[deepspeed\]'$"):
        build_engine(None, cfg)  # before the model is looked at
    with pytest.raises(ConfigError, match=r"^converting a DeepSpeed checkpoint needs DeepSpeed: pip install"):
        deepspeed_to_native(tmp_path, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extraction_without_dali_names_both_extras(monkeypatch, tmp_path, capsys):
    from tools import extract_latents

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    (tmp_path / "images").mkdir()
    out = tmp_path / "latents"
    assert extract_latents.main(["--config", TINY_EXTRACT, f"input={tmp_path / 'images'}", f"output={out}"]) == 2
    line = _one_line(capsys)
    assert line == f"error: {DALI_MISSING}"
    assert "'sfd_scale[extract-cu12]'" in line and "'sfd_scale[extract-cu13]'" in line
    assert not out.exists()
