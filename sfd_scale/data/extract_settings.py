"""Latent extraction's settings, torch-free: ``ExtractConfig`` (schema <- YAML <- ``key=value``) and its checks,
run before anything heavy is imported (``sfd extract``: a typo or a missing input is one line in a second).
The extraction itself is ``extract.py``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..config import ConfigError, load_structured

RANDOM_SEMVAE = "random"  # ``semvae`` value for a tiny random Semantic VAE (with ``random_init``)


def _cuda_available() -> bool:
    import torch  # only when device=cuda is asked for

    return torch.cuda.is_available()


@dataclass
class ExtractConfig:
    input: Optional[str] = None         # class-folder tree, or the root that input_list paths are relative to
    input_list: Optional[str] = None    # text file: "relative/path.jpg label" per line (file order is kept)
    output: Optional[str] = None        # dataset root (part_*/, index.json, stats, sfd_dataset.json)
    resolution: int = 256               # ADM center-crop size; latents are resolution/16 square
    chunk_size: int = 1000              # input items per part
    batch_size: int = 64                # images per encoder call (each also encoded flipped)
    num_threads: int = 4                # DALI decode threads
    device: str = "auto"                # auto | cpu | cuda (cuda: GPU JPEG decode + encoders)
    seed: int = 0                       # posterior noise: generator per (seed, source_index, flip)
    features: bool = True               # also store DINOv2 features (REPA targets), float16
    images: bool = False                # also store each crop as JPEG bytes (column 'image'), for REPA targets
                                        # computed online in training (data.repa_features=online); every encoder
                                        # then sees the decoded JPEG, so stored and online targets agree
    jpeg_quality: int = 95              # images: JPEG quality of the stored crops
    texture_vae: Optional[str] = None   # LDM .ckpt/.pt/.safetensors or diffusers directory
    texture_mode: str = "sample"        # sample | mean (texture posterior)
    dino: Optional[str] = None          # DINOv2 ViT-B/14-reg4 weights (timm or torch-hub layout)
    semvae: Optional[str] = None        # Semantic VAE checkpoint (save_semvae); null: no semantic latents (the
                                        # first pass); 'random' (with random_init): a tiny random one
    random_init: bool = False           # tiny random stand-ins for the downloaded texture VAE and DINOv2 (demos,
                                        # the README recipe's rehearsal); their paths are ignored, ``semvae`` is not
    bf16: bool = False                  # bf16 autocast for the encoders (GPU only)
    dino_antialias: bool = True         # antialiased bicubic resize of the crop to the DINOv2 input size
    progress: Optional[bool] = None     # bar on rank 0; null: when stderr is a terminal (logging.show_progress)


def load_extract_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> ExtractConfig:
    """Schema defaults <- YAML files (with ``includes``) <- ``key=value`` overrides; errors name the key."""
    cfg: ExtractConfig = load_structured(ExtractConfig, files, overrides)
    validate(cfg)
    return cfg


def validate(cfg: ExtractConfig) -> None:
    """Values and the existence of every input, before anything is written."""
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    need(cfg.input is not None, "input is required (image folder, or the root of input_list paths)")
    need(cfg.output is not None, "output is required (dataset directory)")
    need(cfg.resolution > 0 and cfg.resolution % 16 == 0, f"resolution must be a multiple of 16, got {cfg.resolution}")
    for key in ("chunk_size", "batch_size", "num_threads"):
        need(getattr(cfg, key) > 0, f"{key} must be > 0, got {getattr(cfg, key)}")
    need(cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}")
    need(1 <= cfg.jpeg_quality <= 100, f"jpeg_quality must lie in [1, 100], got {cfg.jpeg_quality}")
    need(cfg.texture_mode in ("sample", "mean"), f"texture_mode must be sample or mean, got {cfg.texture_mode!r}")
    need(cfg.device != "cuda" or _cuda_available(), "device is 'cuda' but no CUDA device is available")
    need(Path(cfg.input).is_dir(), f"input folder not found: {cfg.input}")
    need(cfg.input_list is None or Path(cfg.input_list).is_file(), f"input_list file not found: {cfg.input_list}")
    need(cfg.semvae != RANDOM_SEMVAE or cfg.random_init, "semvae=random needs random_init=true")
    if cfg.random_init and cfg.semvae not in (None, RANDOM_SEMVAE):
        need(Path(cfg.semvae).exists(), f"semvae weights not found: {cfg.semvae}")
    if cfg.random_init and cfg.semvae is None:
        need(cfg.features, "semvae (a path, or random) is required without features (a first pass keeps them)")
    if not cfg.random_init:
        for key in ("texture_vae", "dino", "semvae"):
            if key == "semvae" and cfg.semvae is None:  # first pass: features to train the Semantic VAE on
                need(cfg.features, "semvae weights path is required (or features=true for a first pass without "
                                   "semantic latents, whose DINOv2 features train the Semantic VAE)")
                continue
            need(getattr(cfg, key) is not None, f"{key} weights path is required (or set random_init=true)")
            need(Path(getattr(cfg, key)).exists(), f"{key} weights not found: {getattr(cfg, key)}")
