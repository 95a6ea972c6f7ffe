"""Benchmarks run by `mbc bench ...`."""
