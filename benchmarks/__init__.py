"""Benchmarks: each module prints a table and writes JSON with --json PATH."""
