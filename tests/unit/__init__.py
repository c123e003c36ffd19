"""Unit tests: no runtime process is started (the rule is in :mod:`tests`)."""
