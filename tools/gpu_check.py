"""``python tools/gpu_check.py ...`` is ``sfd gpu-check ...`` (``sfd_scale/apps/gpu_check.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
