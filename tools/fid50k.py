"""``python tools/fid50k.py ...`` is ``sfd fid50k ...`` (``sfd_scale/apps/fid50k.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.fid50k import main

if __name__ == "__main__":
    sys.exit(main())
