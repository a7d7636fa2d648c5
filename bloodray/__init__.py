"""bloodray."""
