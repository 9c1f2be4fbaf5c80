"""One script per claim. Run them from the repository root (`make bench-…`, or
`python -m benchmarks.NAME`): the reliability benchmarks use tests/harness.py."""

import os
import tempfile

# Benchmarks look at the same images on purpose (several protocols, several runs): their looks
# go to an evidence ledger of their own, never the user's.
os.environ.setdefault("BBSMOOTH_LEDGER", tempfile.mkdtemp(prefix="bbsmooth-bench-ledger-"))
