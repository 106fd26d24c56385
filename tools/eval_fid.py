"""``python tools/eval_fid.py ...`` is ``sfd fid ...`` (``sfd_scale/apps/fid.py``): kept for checkouts and scripts."""
import sys

from sfd_scale.apps.fid import main

if __name__ == "__main__":
    sys.exit(main())
