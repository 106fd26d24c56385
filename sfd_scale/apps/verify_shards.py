"""Check every shard file of an sfd_scale latent dataset against the size and content checksum its index.json
records: ``sfd verify-shards DATASET_DIR``.

Prints one line per damaged shard (the file, what is wrong, what to do) and exits with status 2 if any is
damaged, 0 otherwise. Shards written before sfd_scale recorded checksums are checked for their size only
(one warning line says how many). Training checks each shard the same way on its first read.
"""
import sys
import time

from ..cli import add_progress_flag, command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd verify-shards", __doc__)
    parser.add_argument("root", help="latent dataset folder (the data.path of a training run)")
    add_progress_flag(parser, "a bar over the shard files")
    args = parser.parse_args(argv)
    from ..data.shard_check import dataset_entries, verify_dataset
    from ..data.shards import ShardFormatError, read_meta
    from ..logging import show_progress

    t0 = time.time()
    try:
        read_meta(args.root)  # a finished dataset, or the error says what it is not
        total = len(dataset_entries(args.root))
        bad = verify_dataset(args.root, report=lambda line: print(line, file=sys.stderr),
                             progress=show_progress(args.progress))
    except (OSError, ValueError, KeyError, ShardFormatError) as err:
        print(f"error: {args.root}: {err}", file=sys.stderr)
        return 2
    if bad:
        print(f"{len(bad)} of {total} shard files of {args.root} are damaged", file=sys.stderr)
        return 2
    print(f"{total} shard files of {args.root} verified in {time.time() - t0:.1f}s")
    return 0
