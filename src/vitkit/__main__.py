"""``python -m vitkit`` (and ``torchrun -m vitkit train``) = the ``vitkit`` command."""

import sys

from .cli.main import main

sys.exit(main())
