"""bloodray: Ray-based training and nightly classification of peripheral blood cell images."""

__version__ = "0.1.0"
