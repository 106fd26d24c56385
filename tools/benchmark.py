"""``python tools/benchmark.py ...`` is ``sfd bench ...`` (``sfd_scale/apps/bench.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.bench import main

if __name__ == "__main__":
    sys.exit(main())
