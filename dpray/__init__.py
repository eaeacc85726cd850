"""dpray: differentially private synthetic instructions, built on Ray."""

__version__ = "0.1.0"
