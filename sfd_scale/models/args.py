"""The LightningDiT architecture as plain settings: the size registry, ``ArchitectureOptions`` (shared with the
run config's ``model`` section) and ``ModelArgs`` (the resolved architecture, its own checks and the layout
rules that need only the architecture).

Torch-free on purpose: ``sfd_scale/config.py`` builds on these classes, and a config is read and checked
(a typo reported, ``--print-config``) before torch or megatron-core are imported. ``lightningdit.py`` builds
the network from a ``ModelArgs`` and re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

# what each tensor-parallel split divides, as error messages name it (``tensor_parallel.py``'s rules and
# ModelArgs.check_tensor_parallel)
HEADS = "attention heads (model.num_heads)"
MLP_UNITS = "MLP hidden units (int(model.hidden_size x model.mlp_ratio), x 2/3 for SwiGLU)"
FINAL_OUTPUTS = "final-layer outputs (patch_size^2 x out_channels)"

# name -> (depth, hidden, heads); official registry (the 1p0B entry is what the paper calls "XXL").
SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "1p0B": (24, 1536, 24),
    "1p6B": (28, 1792, 28),
}
SIZE_ALIASES = {"XXL": "1p0B"}

# DINOv2 variant -> feature width (REPA target dim), as the official code maps repa_dino_version.
REPA_FEATURE_DIMS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536}


@dataclass


class ArchitectureOptions:
    """The architecture settings a run's config (``config.ModelConfig``) and ``ModelArgs`` share, declared once
    here: the config section inherits them and adds how the size is chosen (a registry name, optional
    overrides); ``ModelArgs`` adds the resolved size and channel count."""

    input_size: int = 16                 # latent side length (image size / VAE downsampling)
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    mlp_ratio: float = 4.0
    use_qknorm: bool = True
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False
    use_repa: bool = False
    repa_depth: int = 2                  # REPA projection after this many blocks
    repa_projector_dim: int = 2048
    repa_feature_dim: int = 768          # width of the REPA target features (DINOv2 variant: REPA_FEATURE_DIMS)


@dataclass


class ModelArgs(ArchitectureOptions):
    """Everything that fixes the architecture (and therefore the state-dict shapes). Not frozen only because a
    dataclass cannot share a base with the (mutable) config section; treat it as a value."""

    patch_size: int = 1
    in_channels: int = 48
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    dual_time_embed: bool = True  # SFD: separate texture / semantic time embedders

    def __post_init__(self):
        checks = [
            (self.input_size % self.patch_size == 0,
             f"input_size {self.input_size} not divisible by patch_size {self.patch_size}"),
            (self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"),
            (not self.dual_time_embed or self.hidden_size % 2 == 0,
             f"dual time embedding needs an even hidden_size, got {self.hidden_size}"),
            (not self.use_repa or 1 <= self.repa_depth <= self.depth,
             f"repa_depth {self.repa_depth} must lie in 1..depth ({self.depth})"),
            (self.in_channels > 0 and self.depth > 0, "in_channels and depth must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"model: {msg}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        return int(2 / 3 * hidden) if self.use_swiglu else hidden

    # the layout rules that need only the architecture (config.validate checks them before any rank starts)
    def check_tensor_parallel(self, tp_size: int) -> None:
        """Every tensor-parallel split (``tensor_parallel.py``) divides over ``tp_size`` ranks; ValueError
        naming the config field otherwise."""
        counts = [(self.num_heads, HEADS), (self.mlp_hidden, MLP_UNITS), (self.hidden_size, "model.hidden_size"),
                  (self.patch_size ** 2 * self.out_channels, FINAL_OUTPUTS)]
        for n, what in counts:
            if n % tp_size:
                raise ValueError(f"{what} = {n} is not divisible by the tensor parallel size {tp_size}")

    def check_pipeline_split(self, pipeline_parallel: int, virtual_stages: int = 1) -> None:
        check_pipeline_split(self.depth, pipeline_parallel, virtual_stages)


def check_pipeline_split(depth: int, pipeline_parallel: int, virtual_stages: int = 1) -> None:
    """``depth`` blocks split evenly over ``pipeline_parallel`` x ``virtual_stages`` (virtual) pipeline stages."""
    if depth % (pipeline_parallel * virtual_stages):
        raise ValueError(f"model depth {depth} is not divisible by parallel.pipeline_parallel x "
                         f"parallel.virtual_stages = {pipeline_parallel} x {virtual_stages}")


def parse_model_name(name: str) -> Tuple[int, int, int, int]:
    """'LightningDiT-XL/1' -> (depth, hidden, heads, patch). Clear error naming the known sizes."""
    known = sorted(SIZES) + sorted(SIZE_ALIASES)
    try:
        family, patch = name.rsplit("/", 1)
        prefix, size = family.split("-", 1)
        size = SIZE_ALIASES.get(size, size)
        if prefix != "LightningDiT" or size not in SIZES or patch not in ("1", "2"):
            raise ValueError
    except ValueError:
        raise ValueError(f"unknown model name {name!r}: expected 'LightningDiT-<size>/<patch>' with size in "
                         f"{known} and patch 1 or 2") from None
    depth, hidden, heads = SIZES[size]
    return depth, hidden, heads, int(patch)


def args_for(name: str, **overrides) -> ModelArgs:
    depth, hidden, heads, patch = parse_model_name(name)
    return ModelArgs(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **overrides)
