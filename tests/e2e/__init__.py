"""End-to-end tests: each starts the runtime's processes (the rule is in :mod:`tests`)."""
