"""``python tools/bench_loader.py ...`` is ``sfd bench-loader ...`` (``sfd_scale/apps/bench_loader.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.bench_loader import main

if __name__ == "__main__":
    sys.exit(main())
