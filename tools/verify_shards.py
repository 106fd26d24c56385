"""``python tools/verify_shards.py ...`` is ``sfd verify-shards ...`` (``sfd_scale/apps/verify_shards.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.verify_shards import main

if __name__ == "__main__":
    sys.exit(main())
