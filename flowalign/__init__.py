"""flowalign: align text-to-image flow-matching models with reinforcement learning."""

__version__ = "0.1.0"
