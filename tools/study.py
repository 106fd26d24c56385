"""``python tools/study.py ...`` is ``sfd study ...`` (``sfd_scale/apps/study.py``): kept for checkouts and scripts."""
import sys

from sfd_scale.apps.study import main

if __name__ == "__main__":
    sys.exit(main())
