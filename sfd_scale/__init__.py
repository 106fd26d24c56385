"""sfd_scale: train Semantic-First Diffusion (SFD) image generators at scale.

Layout: ``models`` (LightningDiT on megatron-core layers, official checkpoints), ``diffusion`` (the SFD
math, guidance, samplers), ``data``, ``parallel``, ``train``, ``eval``; ``config`` is the typed schema;
``checkpoint_store`` and ``logging`` the ground floor. Imports run one way (README "Layout", .importlinter).
"""
import warnings

# megatron-core announces at import that it falls back to torch kernels without Apex / Transformer
# Engine (the supported CPU and plain-GPU path); say it once in the docs instead of on every run.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

__version__ = "0.1.0"
