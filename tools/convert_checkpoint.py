"""``python tools/convert_checkpoint.py ...`` is ``sfd convert ...`` (``sfd_scale/apps/convert.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.convert import main

if __name__ == "__main__":
    sys.exit(main())
