"""The scripts and server applications the tests run as subprocesses (not collected)."""
