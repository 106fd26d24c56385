"""``python tools/bench_online_repa.py ...`` is ``sfd bench-online-repa ...`` (``sfd_scale/apps/bench_online_repa.py``):
kept for checkouts and scripts."""
import sys

from sfd_scale.apps.bench_online_repa import main

if __name__ == "__main__":
    sys.exit(main())
