"""The Semantic VAE's settings, torch-free: its architecture (``SemVAEArgs``, which ``model.py`` builds and stores
in every checkpoint) and the typed config of its trainer (``train.py``), loaded and checked by
``load_semvae_config`` before anything heavy is imported (``sfd semvae``: a typo is one line in a second)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..config import ConfigError, LoggingConfig, OptimConfig, load_structured


@dataclass
class SemVAEArgs:
    feature_dim: int = 768           # DINOv2 ViT-B token width
    latent_channels: int = 16        # C_s: channels of the semantic latent
    width: int = 768                 # transformer width of encoder and decoder
    depth: int = 4                   # blocks per half
    num_heads: int = 6
    mlp_ratio: float = 4.0


@dataclass
class SemVAEDataConfig:
    source: str = "random"          # random | shards | images
    path: Optional[str] = None      # shards: MDS directory whose samples hold feats_dino (768, 16, 16);
                                    # images: image folder (one sub-folder per class, or the root of input_list)
    eval_path: Optional[str] = None  # shards / images: held-out MDS directory / image folder; null = the last
                                     # eval_size training samples
    eval_size: int = 64             # samples in the fixed evaluation batch
    hflip: bool = True              # shards: take feats_dino_flip (when stored) for a random half of the samples;
                                    # images: mirror a random half of the crops
    num_workers: int = 2            # shards: DataLoader workers; images: DALI decoding threads
    input_list: Optional[str] = None  # images: "relative/path label" per line instead of the class folders
    resolution: int = 256           # images: crop side (DINOv2 sees it resized to 14 * resolution / 16)
    min_crop_frac: float = 0.8      # images: random crop as ADM's random_crop_arr: short side resized to a random
                                    # size in [resolution, resolution / min_crop_frac], then a random square crop
    dino: Optional[str] = None      # images: DINOv2 ViT-B/14-reg4 weights (as extraction's ``dino``)
    dino_random_init: bool = False  # images: the extraction's tiny random DINOv2 stand-in (tests, demos)
    grid_size: int = 16             # random: token grid side
    random_rank: int = 8            # random: rank of the Gaussian's covariance (plus isotropic noise)
    random_noise: float = 0.05      # random: std of the isotropic noise
    random_seed: int = 0            # random: seed of the fixed distribution (independent of train.seed)


@dataclass
class SemVAEOptimConfig(OptimConfig):
    """The run's AdamW settings with the paper's SemVAE recipe as defaults, plus its schedule and KL weight."""
    lr: float = 5e-5
    warmup_steps: int = 500         # linear warm-up to lr
    constant_until: int = 800_000   # constant lr until this step, then cosine decay
    final_lr: float = 5e-6          # lr reached at total_steps
    total_steps: int = 1_000_000
    kl_weight: float = 1e-7


@dataclass
class SemVAETrainSection:
    batch_size: int = 64
    max_steps: Optional[int] = None  # stop after this many steps; null = optim.total_steps
    seed: int = 0
    log_every: int = 100
    eval_every: int = 5000          # held-out feature cosine similarity; 0 = only at the end
    save_every: int = 50_000        # semvae_step_XXXXXXX.safetensors + semvae_state.pt; 0 = only at the end
    output_dir: str = "runs/semvae"
    device: str = "auto"            # auto | cpu | cuda
    precision: str = "fp32"         # fp32 | bf16 (autocast forward; fp32 weights and loss)
    resume: bool = True             # continue from <output_dir>/semvae_state.pt when present


@dataclass
class SemVAETrainConfig:
    """One Semantic VAE training run (``sfd semvae``); the model section is the model's own
    ``SemVAEArgs``, as the run config nests the libraries' settings."""
    model: SemVAEArgs = field(default_factory=SemVAEArgs)
    data: SemVAEDataConfig = field(default_factory=SemVAEDataConfig)
    optim: SemVAEOptimConfig = field(default_factory=SemVAEOptimConfig)
    train: SemVAETrainSection = field(default_factory=SemVAETrainSection)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(project="sfd_scale_semvae"))


def load_semvae_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> SemVAETrainConfig:
    """Schema defaults <- each YAML file (after its ``includes``) <- dotlist overrides; then validation."""
    cfg: SemVAETrainConfig = load_structured(SemVAETrainConfig, files, overrides)
    validate_semvae(cfg)
    return cfg


def validate_semvae(cfg: SemVAETrainConfig) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    checks = [
        (m.width % m.num_heads == 0, f"model.width ({m.width}) must be divisible by model.num_heads ({m.num_heads})"),
        (min(m.feature_dim, m.latent_channels, m.depth) > 0, "model.feature_dim, latent_channels, depth must be > 0"),
        (d.source in ("random", "shards", "images"),
         f"data.source must be 'random', 'shards' or 'images', got {d.source!r}"),
        (d.source != "shards" or bool(d.path), "data.path is required when data.source is 'shards' (an MDS directory)"),
        (d.source != "images" or bool(d.path), "data.path is required when data.source is 'images' (an image folder)"),
        (d.source != "images" or bool(d.dino) or d.dino_random_init,
         "data.dino (DINOv2 weights) is required when data.source is 'images' (or data.dino_random_init=true)"),
        (d.resolution > 0 and d.resolution % 16 == 0, f"data.resolution must be a multiple of 16, got {d.resolution}"),
        (0 < d.min_crop_frac <= 1, f"data.min_crop_frac must lie in (0, 1], got {d.min_crop_frac}"),
        (d.eval_size > 0, f"data.eval_size must be > 0, got {d.eval_size}"),
        (o.lr > 0 and o.final_lr >= 0, f"optim.lr must be > 0 and optim.final_lr >= 0, got {o.lr}, {o.final_lr}"),
        (0 <= o.warmup_steps <= o.constant_until <= o.total_steps,
         f"need 0 <= optim.warmup_steps ({o.warmup_steps}) <= optim.constant_until ({o.constant_until}) "
         f"<= optim.total_steps ({o.total_steps})"),
        (o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {o.grad_clip}"),
        (t.batch_size > 0, f"train.batch_size must be > 0, got {t.batch_size}"),
        (t.max_steps is None or t.max_steps >= 0, f"train.max_steps must be >= 0, got {t.max_steps}"),
        (min(t.log_every, t.eval_every, t.save_every) >= 0, "train.log_every / eval_every / save_every must be >= 0"),
        (t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}"),
        (t.precision in ("fp32", "bf16"), f"train.precision must be 'fp32' or 'bf16', got {t.precision!r}"),
        (cfg.logging.wandb_mode in ("offline", "online", "disabled"),
         f"logging.wandb_mode must be offline, online or disabled, got {cfg.logging.wandb_mode!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
