"""Check every shard file of an sfd_scale latent dataset against the size and content checksum its index.json
records: ``python tools/verify_shards.py DATASET_DIR``.

Prints one line per damaged shard (the file, what is wrong, what to do) and exits with status 2 if any is
damaged, 0 otherwise. Shards written before sfd_scale recorded checksums are checked for their size only
(one warning line says how many). Training checks each shard the same way on its first read.
"""
import argparse
import sys
import time

from sfd_scale.data.shard_check import dataset_entries, verify_dataset
from sfd_scale.data.shards import ShardFormatError, read_meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="latent dataset folder (the data.path of a training run)")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        read_meta(args.root)  # a finished dataset, or the error says what it is not
        total = len(dataset_entries(args.root))
        bad = verify_dataset(args.root, report=lambda line: print(line, file=sys.stderr))
    except (OSError, ValueError, KeyError, ShardFormatError) as err:
        print(f"error: {args.root}: {err}", file=sys.stderr)
        return 2
    if bad:
        print(f"{len(bad)} of {total} shard files of {args.root} are damaged", file=sys.stderr)
        return 2
    print(f"{total} shard files of {args.root} verified in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
