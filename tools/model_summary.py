"""``python tools/model_summary.py ...`` is ``sfd summary ...`` (``sfd_scale/apps/summary.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.summary import main

if __name__ == "__main__":
    sys.exit(main())
