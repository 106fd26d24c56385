"""sfd_scale: train Semantic-First Diffusion (SFD) image generators at scale.

Layout: ``models`` (LightningDiT on megatron-core layers, official checkpoints), ``diffusion`` (the SFD
math, guidance, samplers), ``data``, ``parallel``, ``train``, ``eval``; ``config`` is the typed schema;
``checkpoint_store`` and ``logging`` the ground floor. Imports run one way (README "Layout", .importlinter).
"""
import logging
import warnings

# megatron-core announces at import that it falls back to torch kernels without Apex / Transformer
# Engine (the supported CPU and plain-GPU path); say it once in the docs instead of on every run.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
# megatron-core's NCCL allocator (megatron.core.nccl_allocator, imported with megatron.core.distributed by
# the engines) imports torch.utils.cpp_extension, which warns at import on a machine without a GPU that it
# found CUDA_HOME but no CUDA runtime: nothing is compiled on that path, so every CPU run (tests, rehearsals,
# tools) printed an unrelated warning first. Only that message is dropped; the logger's others stay.
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not str(record.msg).startswith("No CUDA runtime is found"))

__version__ = "0.1.0"
