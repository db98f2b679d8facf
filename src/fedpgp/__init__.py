"""fedpgp: federated prompt learning on a frozen CLIP (FedPGP and its baselines)."""

__version__ = "0.2.0"
