"""``python tools/plan_layout.py ...`` is ``sfd plan ...`` (``sfd_scale/apps/plan.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.plan import main

if __name__ == "__main__":
    sys.exit(main())
