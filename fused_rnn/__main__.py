"""``python -m fused_rnn train|sample|bench ...``: the ``fused-rnn`` console script."""

import sys

from fused_rnn.cli import main

sys.exit(main())
