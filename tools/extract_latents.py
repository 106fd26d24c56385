"""``python tools/extract_latents.py ...`` is ``sfd extract ...`` (``sfd_scale/apps/extract.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.extract import main

if __name__ == "__main__":
    sys.exit(main())
