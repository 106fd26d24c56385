"""The ``sfd`` command (``sfd_scale/apps``, issue #18): one subcommand per tool, each ``tools/*.py`` a shim of one;
``--help`` of every subcommand exits 0 without importing torch & co.; the dispatcher's own errors are one line;
and a wheel built from the checkout, installed into a fresh environment, trains the demo from any directory."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from sfd_scale.apps import COMMANDS, main
from sfd_scale.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "megatron", "deepspeed", "nvidia.dali", "streaming", "wandb")
SHIM = re.compile(r"^from sfd_scale\.apps\.(\w+) import main$", re.M)


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("SFD_DEBUG", None)
    return env


# ----------------------------------------------------------------------------------------------- the commands
def test_every_tool_is_a_shim_of_its_own_command():
    tools = {p.stem: p.read_text() for p in (REPO / "tools").glob("*.py") if p.stem != "__init__"}
    shims = {tool: SHIM.findall(text) for tool, text in tools.items()}
    assert all(len(found) == 1 for found in shims.values()), shims
    modules = {tool: found[0] for tool, found in shims.items()}
    commands = {module.split(".")[-1]: name for name, (module, _) in COMMANDS.items() if module.startswith("apps.")}
    assert set(modules.values()) <= set(commands) and len(set(modules.values())) == len(modules), modules
    assert all(len(text.splitlines()) <= 8 for text in tools.values())  # a shim, not a second copy
    apps = {p.stem for p in (REPO / "sfd_scale" / "apps").glob("*.py")} - {"__init__"}
    assert apps == set(commands)  # every module of sfd_scale/apps is a command
    assert {modules[t] for t in ("train", "train_semvae", "eval_fid", "benchmark")} == {"train", "semvae", "fid",
                                                                                       "bench"}


def test_every_command_help_exits_0_and_imports_nothing_heavy(tmp_path):
    """One process, every subcommand's ``--help`` (torchrun's, which is torch's own, last), outside the checkout."""
    script = f"""
import contextlib, io, json, sys
from sfd_scale.apps import COMMANDS, command_main
results = {{}}
for name in [n for n in COMMANDS if n != "torchrun"] + ["torchrun"]:
    if name == "torchrun":
        results["heavy"] = sorted(m for m in {HEAVY!r} if m in sys.modules)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = command_main(name)(["--help"])
        except SystemExit as done:
            code = done.code
    results[name] = [code, out.getvalue()]
print(json.dumps(results))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    assert results.pop("heavy") == [], "imported by the --help of the commands"
    assert {name: code for name, (code, _) in results.items()} == {name: 0 for name in COMMANDS}
    for name, (_, text) in results.items():
        assert name == "torchrun" or text.startswith(f"usage: sfd {name} "), (name, text[:200])
    # the commands whose key=value arguments are run-config keys list the config sections and keys
    assert all("config sections:" in results[name][1] for name in ("train", "sample", "sample-fid", "fid50k",
                                                                    "study", "plan", "cost-model", "bench"))


# a config typo of every command that reads a config before a checkpoint or data: reported before anything heavy
TYPOS = {"train": ["--config", "demo/digits", "bogus.key=1"],
         "semvae": ["--config", "semvae/tiny_cpu", "bogus=1"],
         "extract": ["--config", "extract/tiny_cpu", "bogus=1"],
         "bench": ["--config", "bench/cpu_small", "bogus.key=1"],
         "plan": ["--config", "bench/h100_xxl", "--gpus", "8", "bogus.key=1"],
         "cost-model": ["--config", "bench/h100_xxl", "bogus.key=1"],
         "convert": ["official-to-native", "x.pt", "--config", "demo/digits", "--out", "x", "bogus.key=1"],
         "summary": ["--config", "demo/digits", "bogus.key=1"],
         "study": ["studies/digits_cpu", "--out", "x", "bogus.key=1"]}


def test_a_config_typo_of_every_command_is_one_line_before_anything_heavy(tmp_path):
    script = f"""
import json, sys
from sfd_scale.apps import main
print(json.dumps({{name: [main([name, *argv]), sorted(m for m in {HEAVY!r} if m in sys.modules)]
                  for name, argv in {TYPOS!r}.items()}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert json.loads(done.stdout) == {name: [2, []] for name in TYPOS}, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == len(TYPOS) and all(line.startswith("error: ") and "bogus" in line for line in lines), lines
    assert not list(tmp_path.iterdir())  # nothing written


def test_sfd_help_lists_the_commands_and_its_errors_are_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in COMMANDS)
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("sfd (sfd_scale) ")
    assert main(["trian", "--config", "x"]) == 2
    assert capsys.readouterr().err == ("error: sfd: unknown command 'trian'; did you mean 'train'? "
                                       "(sfd --help lists the commands)\n")
    assert main([]) == 2 and capsys.readouterr().err.startswith("error: sfd: a command is needed")
    assert main(["--nope", "train"]) == 2 and "unknown option '--nope'" in capsys.readouterr().err


def test_a_subcommand_keeps_the_one_line_error_and_debug_before_it_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("SFD_DEBUG", raising=False)
    assert main(["train", "--config", "demo/digits", "bogus.key=1"]) == 2
    assert capsys.readouterr().err == "error: command line: bad key 'bogus': Key 'bogus' not in 'Config'\n"
    with pytest.raises(ConfigError, match="bad key 'bogus'"):
        main(["--debug", "train", "--config", "demo/digits", "bogus.key=1"])


def test_shipped_configs_and_slurm_scripts_are_printed_by_name(capsys):
    assert main(["configs"]) == 0 and "experiments/sfd_xl" in capsys.readouterr().out.split()
    assert main(["configs", "demo/digits"]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / "demo" / "digits.yaml").read_text()
    assert main(["slurm-script", "--path", "train"]) == 0
    assert Path(capsys.readouterr().out.strip()) == (REPO / "slurm" / "train.sbatch").resolve()
    assert main(["slurm-script", "common.sh"]) == 0 and "sfd_srun()" in capsys.readouterr().out
    assert main(["slurm-script", "trian"]) == 2
    assert capsys.readouterr().err.startswith("error: no shipped SLURM script 'trian' in ")


# ----------------------------------------------------------------------------------------------- installed
TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "data.demo_samples=128",
        "train.global_batch_size=16", "train.max_steps=4", "checkpoint.every=2", "train.log_every=2",
        "logging.wandb_mode=disabled", "sample.method=euler", "sample.num_steps=4", "sample.grid_images=4",
        "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel built (not editable) from a copy of the checkout's package files, installed with --no-deps into a
    fresh venv that sees this interpreter's site-packages (torch & co.) after its own: the venv's bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # pip builds in the source tree: a copy keeps build/ and *.egg-info out of the checkout
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("configs", "slurm"):
        shutil.copytree(REPO / name, src / name)
    shutil.copytree(REPO / "sfd_scale", src / "sfd_scale", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(src)], check=True, capture_output=True, timeout=600, cwd=root)
    wheel = next((root / "dist").glob("sfd_scale-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True,
                   timeout=300)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # this interpreter's packages (torch, megatron-core, pip, ...), after the venv's own; their .pth files (an
    # editable sfd_scale among them) are not run from a path added this way
    parents = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (purelib / "zz_parent_site.pth").write_text("\n".join(parents) + "\n")
    # --ignore-installed: an sfd_scale installed where this interpreter runs (seen through that .pth) is left alone
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                    "--ignore-installed", "-q", str(wheel)], check=True, capture_output=True, timeout=600, cwd=root,
                   env=_env())
    return venv / "bin"


def test_the_wheel_holds_the_configs_scripts_and_the_command(installed):
    wheel = next(installed.parent.parent.glob("dist/sfd_scale-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    configs = {f"sfd_scale/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    scripts = {f"sfd_scale/slurm/{p.name}" for p in (REPO / "slurm").iterdir()}
    assert configs <= names and scripts <= names and "sfd_scale/apps/train.py" in names
    assert re.search(r"^sfd = sfd_scale\.apps:main$", entry_points, re.M), entry_points


def test_installed_sfd_trains_the_demo_from_any_directory(installed, tmp_path):
    env = _env(PATH=f"{installed}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)  # nothing of the checkout
    where = subprocess.run([str(installed / "python"), "-c", "import sfd_scale; print(sfd_scale.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), where.stdout + where.stderr

    started = time.perf_counter()
    typo = subprocess.run(["sfd", "train", "--config", "demo/digits", "bogus.key=1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    print(f"installed `sfd train` with a config typo: exit {typo.returncode} after "
          f"{time.perf_counter() - started:.2f} s")  # shown with -s
    assert typo.returncode == 2 and typo.stdout == ""
    assert typo.stderr.splitlines() == ["error: command line: bad key 'bogus': Key 'bogus' not in 'Config'"]

    script = subprocess.run(["sfd", "slurm-script", "--path", "train"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert Path(script.stdout.strip()).is_relative_to(installed.parent) and Path(script.stdout.strip()).is_file()

    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    run = subprocess.run(["sfd", "train", "--config", "demo/digits", *TINY], cwd=anywhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = anywhere / "runs" / "demo_digits"  # the demo's train.output_dir, under the working directory
    assert (out / "samples" / "final.png").stat().st_size > 0
    assert (out / "checkpoints" / "step_0000004" / "manifest.json").is_file()
    assert "it/s]" not in run.stderr and "step 4:" in run.stdout  # no terminal: plain log lines, no bar
