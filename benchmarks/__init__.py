"""One script per claim. Run them from the repository root (`make bench-…`, or
`python -m benchmarks.NAME`): the reliability benchmarks use tests/harness.py."""
