"""Benchmarks run from the command line (`eplb bench ...`)."""
