"""Fakes for unit and integration tests; features are claimed on the real engine in tests/e2e."""
