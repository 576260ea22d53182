"""botgate benchmarks: `python -m bench` (full, writes BENCHMARKS.md) or `python -m bench --quick`."""
