"""Convert an official SFD latent folder (``*.safetensors`` shards + ``*_stats.pt``) into sfd_scale latent
shards, value-exact: ``sfd import-latents OFFICIAL_DIR OUT_DIR``.

Train on the result with ``data.source=shards data.path=OUT_DIR``. Rerunning after an interruption
continues where it stopped. ``--images IMAGENET_TRAIN`` also stores each sample's image (the centre crop as
JPEG) for REPA targets computed online (``data.repa_features=online data.dino=DINOV2_WEIGHTS``); the images
must be in the official sample order (ImageFolder order, or ``--image-list`` lines ``relative/path label``).
"""
import time

from ..cli import add_progress_flag, as_user_errors, command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd import-latents", __doc__)
    parser.add_argument("src", help="official latent folder")
    parser.add_argument("dst", help="output folder for the sfd_scale shards")
    parser.add_argument("--images", default=None, help="image folder to attach each sample's image from")
    parser.add_argument("--image-list", default=None, help="with --images: 'relative/path label' per line, in the "
                                                           "official sample order (default: ImageFolder order)")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--num-threads", type=int, default=4, help="DALI decoding threads")
    add_progress_flag(parser, "a bar over the shard files")
    args = parser.parse_args(argv)
    from ..data.official import import_official
    from ..logging import show_progress

    t0 = time.time()
    with as_user_errors(FileNotFoundError, KeyError, ValueError):  # the official folder's missing keys, shapes
        info = import_official(args.src, args.dst, progress=show_progress(args.progress), images=args.images,
                               image_list=args.image_list, jpeg_quality=args.jpeg_quality,
                               num_threads=args.num_threads)
    print(f"Imported {info['num_samples']} samples from {args.src} into {info['parts']} parts at {args.dst} in "
          f"{time.time() - t0:.1f}s; columns {', '.join(sorted(info['columns']))}; statistics {info['stats']}.")
    return 0
