"""Benchmarks: measured on request, never asserted by a unit test. See each module."""
