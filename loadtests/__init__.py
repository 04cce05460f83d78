"""Load tests of OpenAI-compatible endpoints; they reach a deployment over HTTP only, never through serve."""
