"""The README's recipe "From an ImageNet folder to FID-50K", rehearsed end to end on a CPU.

The commands are read from the README's ``<!-- recipe:NAME -->`` blocks and run as they are, in order, each in
``bash`` with the recipe's variables ($IMAGENET, $WORK, $WEIGHTS, ...) pointing into a temporary directory and
only the miniature overrides of ``MINIATURE`` appended: tiny models, a few steps, 64 x 64 crops, a few images,
``random_init`` stand-ins for the downloaded texture VAE and DINOv2 (built by the same code as the real ones).
So the README cannot drift from the tools: a renamed flag, key or config file fails here.

The input is a real class-folder tree: crops of scikit-learn's two sample photos, 3 classes x 4 JPEGs. Blocks
that cannot run here are listed in ``NOT_RUN`` with the reason; a block that is neither run nor listed fails.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- recipe:([\w-]+) -->\s*```bash\n(.*?)```\s*<!-- /recipe:\1 -->", re.S)
CLASSES, PER_CLASS, CROP = 3, 4, 64
VAE = "$WEIGHTS/ldm-imagenet256-f16d32-50ep.ckpt"
STEP_TIMEOUT_S = 600

# The order the README gives and the test runs.
ORDER = ["paths", "download", "extract-features", "train-semvae", "extract-latents", "train-1-node", "train-n-nodes",
         "train-guide", "sample", "fid", "study"]
NOT_RUN = {
    "paths": "the test sets these variables itself (to its temporary directory; checked to be the same names)",
    "download": "no network in CI: files of the same names stand in (checked against the URLs)",
    "train-n-nodes": "needs a SLURM cluster; slurm/train.sbatch runs on a real one in tests/slurm/test_sbatch.py",
}

# ----------------------------------------------------------------------------------------------- miniature
TINY_EXTRACT = ["resolution=64", "chunk_size=6", "batch_size=6", "num_threads=1", "device=cpu", "random_init=true",
                "progress=false"]
TINY_RUN = ["train.device=cpu", "train.precision=fp32", "train.global_batch_size=6", "train.log_every=1",
            "train.max_steps=4", "checkpoint.every=2", "data.canonical_nodes=1", "data.num_workers=0",
            "model.input_size=4", f"model.num_classes={CLASSES}", "model.repa_projector_dim=32",
            "logging.wandb_mode=disabled", "logging.progress=false", "sample.method=euler", "sample.num_steps=2",
            "sample.grid_images=3"]
TINY_SFD = ["model.depth=2", "model.hidden_size=64", "model.num_heads=4"]  # on top of the XL config's name
GUIDE_STEP = "$WORK/runs/sfd_b_autoguidance/checkpoints/step_0000002"      # an early guide, as Tab. 9's 70K of 120K
MINIATURE = {
    "extract-features": TINY_EXTRACT,
    "train-semvae": ["model.width=64", "model.depth=1", "model.num_heads=2", "optim.warmup_steps=2",
                     "optim.constant_until=6", "optim.total_steps=8", "train.max_steps=8", "train.batch_size=8",
                     "train.log_every=4", "train.eval_every=8", "train.save_every=0", "train.device=cpu",
                     "data.eval_size=4", "data.grid_size=4", "data.num_workers=0", "logging.wandb_mode=disabled",
                     "logging.progress=false"],
    "extract-latents": TINY_EXTRACT,
    "train-1-node": TINY_RUN + TINY_SFD,
    # the guide keeps its registry size (sample.guide_model builds it by name): LightningDiT-S/1 instead of B/1
    "train-guide": TINY_RUN + ["model.name=LightningDiT-S/1"],
    "sample": ["--num-images", "6", "--batch", "6", "train.device=cpu", f"sample.guide_checkpoint={GUIDE_STEP}",
               "sample.guide_model=LightningDiT-S/1", "sample.num_steps=8"],
    "fid": ["--batch", "16", "--device", "cpu"],
    "study": ["--launcher", "local", "--set", "eval.steps=[2]", "--set", "eval.images=6", "--set", "eval.batch=6",
              "--set", "checkpoint_every=2", *TINY_RUN, *TINY_SFD],
}


# ----------------------------------------------------------------------------------------------- README
def recipe_blocks(text: str) -> dict:
    """name -> its one command (backslash continuations joined), in README order."""
    blocks = {}
    for name, body in BLOCK.findall(text):
        command = re.sub(r"\\\n\s*", "", body).strip()
        assert "\n" not in command, f"recipe block {name!r} must hold one command, got:\n{body}"
        assert name not in blocks, f"recipe block {name!r} appears twice"
        blocks[name] = command
    return blocks


@pytest.fixture(scope="module")
def recipe() -> dict:
    return recipe_blocks((REPO / "README.md").read_text())


def test_readme_recipe_is_complete_and_consistent(recipe):
    """Every step, in order, one command each; every variable and downloaded file the steps use is defined."""
    assert list(recipe) == ORDER
    assert set(MINIATURE) | set(NOT_RUN) == set(ORDER) and not set(MINIATURE) & set(NOT_RUN)
    defined = set(re.findall(r"(\w+)=", recipe["paths"].removeprefix("export ")))
    used = {v for name in ORDER[1:] for v in re.findall(r"\$(\w+)", recipe[name])}
    inline = set(re.findall(r"(?:^| )(SFD_\w+)=", recipe["study"]))
    assert used - inline == defined == set(rehearsal_env(Path("/x"))) - {"OMP_NUM_THREADS", "TMPDIR", "PATH"}
    downloads = {url.rsplit("/", 1)[1] for url in re.findall(r"https://\S+", recipe["download"])}
    referenced = {f for name in ORDER[2:] for f in re.findall(r"\$WEIGHTS/([\w.-]+)", recipe[name])}
    assert referenced <= downloads and len(downloads) == 4
    assert "dinov2_vitb14_reg4_pretrain.pth" in referenced and "inception-2015-12-05.pt" in referenced


# ----------------------------------------------------------------------------------------------- stand-ins
def write_photo_tree(root: Path) -> np.ndarray:
    """$IMAGENET/train/<class>/*.JPEG from crops (some mirrored or flipped) of the two sample photos; returns the
    64 x 64 centre crops of all of them (N, 64, 64, 3) uint8, the rehearsal's reference batch."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: 427 x 640 x 3 uint8
    crops = []
    for c in range(CLASSES):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            photo = photos[(c + i) % 2]
            size = 180 + 40 * i
            y, x = 30 * c + 20 * i, 90 * c + 50 * i
            img = photo[y:y + size, x:x + size]
            img = img[:, ::-1] if i % 2 else img
            img = img[::-1] if c == 2 else img
            pil = Image.fromarray(np.ascontiguousarray(img))
            pil.save(folder / f"n{c:08d}_{i}.JPEG", quality=90)
            crops.append(np.asarray(pil.resize((CROP, CROP), Image.BICUBIC)))
    return np.stack(crops)


def write_weights(weights: Path, reference: np.ndarray) -> None:
    """Files in place of the downloads: the tiny texture VAE that extraction's ``random_init`` builds (a diffusers
    folder under the .ckpt's name; the loader reads both forms), a reference batch of the photos, and a tiny
    Inception stand-in in NVIDIA's layout, with the softmax layer IS needs (``tests/eval/inception_standin.py``).
    DINOv2: ``random_init`` ignores it."""
    from sfd_scale.data.encoders import TextureVAE
    from tests.eval.inception_standin import build_inception_standin

    weights.mkdir(parents=True)
    TextureVAE.random_init(0).vae.save_pretrained(str(weights / "ldm-imagenet256-f16d32-50ep.ckpt"))
    np.savez(weights / "VIRTUAL_imagenet256_labeled.npz", arr_0=reference)
    build_inception_standin(weights / "inception-2015-12-05.pt")


def rehearsal_env(root: Path) -> dict:
    """The recipe's variables, here, plus a private TMPDIR (streaming's locks) and on PATH the ``sfd`` command
    (``write_sfd_command``) and this interpreter."""
    return {"IMAGENET": str(root / "imagenet"), "WORK": str(root / "work"), "WEIGHTS": str(root / "weights"),
            "GPUS_PER_NODE": "1", "NODES": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(root / "tmp"),
            "PATH": os.pathsep.join([str(root / "bin"), str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def write_sfd_command(bin_dir: Path) -> None:
    """``sfd`` as ``pip install`` puts it on the path, for this interpreter and the checkout's package (PYTHONPATH):
    the rehearsal runs the checkout's code whatever is installed."""
    bin_dir.mkdir(parents=True)
    (bin_dir / "sfd").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m sfd_scale "$@"\n')
    (bin_dir / "sfd").chmod(0o755)


def run_step(name: str, command: str, env: dict, root: Path) -> str:
    """The README command plus its miniature overrides, in bash from a directory outside the checkout (the recipe
    names configs by their shipped names and writes under $WORK); returns its output."""
    extra = [o.replace("$WORK", env["WORK"]).replace("$WEIGHTS", env["WEIGHTS"]) for o in MINIATURE[name]]
    line = f"{command} {' '.join(shlex.quote(o) for o in extra)}"
    r = subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True, text=True,
                       timeout=STEP_TIMEOUT_S)
    (root / "logs").mkdir(exist_ok=True)
    (root / "logs" / f"{name}.log").write_text(f"$ {line}\n{r.stdout}\n{r.stderr}")
    assert r.returncode == 0, f"recipe step {name!r} failed ({r.returncode}):\n$ {line}\n{r.stdout[-3000:]}\n" \
                              f"{r.stderr[-6000:]}"
    return r.stdout


# ----------------------------------------------------------------------------------------------- checks
def dataset_info(path: Path) -> dict:
    assert (path / "index.json").is_file() and (path / "stats.safetensors").is_file(), path
    assert sorted(path.glob("part_*")), f"no shard parts in {path}"
    return json.loads((path / "sfd_dataset.json").read_text())


def check_outputs(name: str, work: Path) -> None:
    """What each step must have produced."""
    if name == "extract-features":
        columns = dataset_info(work / "features")["columns"]
        assert "feats_dino" in columns and "latents" in columns and "latents_sv" not in columns
    elif name == "train-semvae":
        assert (work / "semvae" / "semvae.safetensors").is_file()
    elif name == "extract-latents":
        info = dataset_info(work / "latents")
        assert {"latents", "latents_sv", "feats_dino"} <= set(info["columns"])
        assert json.loads((work / "latents" / "extract_config.json").read_text())["weights"]["semvae"] == \
            str((work / "semvae" / "semvae.safetensors").resolve())  # the trained one, not a stand-in
    elif name in ("train-1-node", "train-guide"):
        run = work / "runs" / ("sfd_xl" if name == "train-1-node" else "sfd_b_autoguidance")
        for step in (2, 4):  # the guide's early checkpoint survives the run
            assert (run / "checkpoints" / f"step_{step:07d}" / "manifest.json").is_file(), sorted(run.rglob("*"))
    elif name == "sample":
        out = work / "fid" / "xl_80ep"
        assert len(list((out / "images").glob("*.png"))) == 6 and (out / "grid.png").is_file()
        npz = np.load(out / "samples_6x64x64x3.npz")["arr_0"]
        assert npz.shape == (6, 64, 64, 3) and npz.dtype == np.uint8 and npz.std() > 0  # decoded pictures
    elif name == "fid":
        metrics = json.loads((work / "fid" / "xl_80ep" / "metrics.json").read_text())
        for key in ("fid", "sfid", "is", "precision", "recall"):
            assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (key, metrics)
    elif name == "study":
        out = work / "studies" / "convergence"
        table = (out / "results.md").read_text()
        assert all(run in table for run in ("sfd", "dt0", "lightningdit_repa", "lightningdit_no_repa")), table
        assert (out / "results.csv").is_file() and (out / "fid_vs_images.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------- the rehearsal
def test_readme_recipe_runs_end_to_end(recipe, tmp_path):
    env_vars = rehearsal_env(tmp_path)
    reference = write_photo_tree(Path(env_vars["IMAGENET"]))
    write_weights(Path(env_vars["WEIGHTS"]), reference)
    Path(env_vars["TMPDIR"]).mkdir()
    write_sfd_command(tmp_path / "bin")
    env = {**os.environ, **env_vars, "PYTHONPATH": str(REPO)}
    for name in ORDER:
        if name in NOT_RUN:
            continue
        run_step(name, recipe[name], env, tmp_path)
        check_outputs(name, Path(env["WORK"]))
