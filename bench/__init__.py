"""Benchmarks (`make bench`): measured numbers, never assertions in tests."""
