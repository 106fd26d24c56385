"""``python tools/import_official_latents.py ...`` is ``sfd import-latents ...``
(``sfd_scale/apps/import_latents.py``): kept for checkouts and scripts."""
import sys

from sfd_scale.apps.import_latents import main

if __name__ == "__main__":
    sys.exit(main())
