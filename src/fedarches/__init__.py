"""fedarches: federated scArches reference atlases."""

__version__ = "0.1.0"
