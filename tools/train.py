"""``python tools/train.py ...`` is ``sfd train ...`` (``sfd_scale/apps/train.py``): kept for checkouts and scripts."""
import sys

from sfd_scale.apps.train import main

if __name__ == "__main__":
    sys.exit(main())
