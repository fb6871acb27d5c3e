"""Contract tests: every store implementation against one suite."""
