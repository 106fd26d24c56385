"""``python tools/sample_fid.py ...`` is ``sfd sample-fid ...`` (``sfd_scale/apps/sample_fid.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.sample_fid import main

if __name__ == "__main__":
    sys.exit(main())
