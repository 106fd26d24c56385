"""Extract SFD latent shards from an image folder (DALI decode, texture VAE + DINOv2 + Semantic VAE).

    python tools/extract_latents.py --config configs/extract/imagenet256.yaml input=/data/imagenet/train \
        output=/data/sfd_latents texture_vae=/w/ldm-imagenet256-f16d32-50ep.ckpt \
        dino=/w/dinov2_vitb14_reg4_pretrain.pth semvae=/w/semvae.safetensors
    RANK=r WORLD_SIZE=n python tools/extract_latents.py ...      # n independent jobs (e.g. a SLURM array)
    python tools/extract_latents.py --config ... --finalize-only  # merge finished parts + statistics

Rerunning the same command resumes: finished parts are kept, only missing chunks are encoded.
All logic lives in ``sfd_scale.data.extract``.
"""
import sys

from sfd_scale.cli import entry_point
from sfd_scale.data import extract


@entry_point
def main(argv=None) -> int:
    extract.main(argv)  # config, input and weights problems: UserErrors, one line
    return 0


if __name__ == "__main__":
    sys.exit(main())
