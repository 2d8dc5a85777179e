import sys

from . import signals

signals.defer()  # (again, for runners other than `python -m`): a Ctrl-C while the CLI is imported is noted

from .cli import main  # noqa: E402

sys.exit(main())
