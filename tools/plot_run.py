"""``python tools/plot_run.py ...`` is ``sfd plot ...`` (``sfd_scale/apps/plot.py``): kept for checkouts and scripts."""
import sys

from sfd_scale.apps.plot import main

if __name__ == "__main__":
    sys.exit(main())
