"""rlx: an RL and evolution-strategies trainer for aligning causal language models."""

__version__ = "0.1.0"
