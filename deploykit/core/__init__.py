"""The shared base every deploykit package may import: errors, settings, loopback ports. It imports nothing
else of the project (tests/unit/test_layers.py holds every package to its layer)."""
