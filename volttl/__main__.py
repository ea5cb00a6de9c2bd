"""Allow ``python -m volttl`` (and ``torchrun -m volttl``)."""

from volttl.cli import main

raise SystemExit(main())
