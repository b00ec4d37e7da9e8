"""Benchmarks of asynccontainer, each reporting against a baseline run side by side."""
