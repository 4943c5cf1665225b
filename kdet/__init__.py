"""kdet: SSD object detectors for Keras."""

__version__ = "0.1.0"
