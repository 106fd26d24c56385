"""``python tools/sample.py ...`` is ``sfd sample ...`` (``sfd_scale/apps/sample.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.sample import main

if __name__ == "__main__":
    sys.exit(main())
