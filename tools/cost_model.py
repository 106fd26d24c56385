"""``python tools/cost_model.py ...`` is ``sfd cost-model ...`` (``sfd_scale/apps/cost_model.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.cost_model import main

if __name__ == "__main__":
    sys.exit(main())
