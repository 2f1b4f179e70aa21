"""Benchmark scripts: side-by-side ratios in one process, each ending with a `BENCH {json}` line."""
