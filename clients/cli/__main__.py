"""`python -m flowport.clients.cli`: the `flowport` command (how `flowport up` starts its servers)."""

import sys

from flowport.clients.cli import main

sys.exit(main())
