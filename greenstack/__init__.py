"""greenstack: sustainable ML training with measured energy, hourly carbon and cost."""

__version__ = "0.1.0"
