"""``python -m sfd_scale COMMAND ...`` = ``sfd COMMAND ...`` (the installed console script; ``sfd_scale.apps``)."""
import sys

from sfd_scale.apps import main

if __name__ == "__main__":
    sys.exit(main())
