"""``python tools/train_semvae.py ...`` is ``sfd semvae ...`` (``sfd_scale/apps/semvae.py``): kept for
checkouts and scripts."""
import sys

from sfd_scale.apps.semvae import main

if __name__ == "__main__":
    sys.exit(main())
