"""End-to-end tests: real HTTPS to the simulator, real processes, real PostgreSQL."""
