"""Unit tests: pure and fast, with no HTTP, subprocess, PostgreSQL or sleeping on real time."""
