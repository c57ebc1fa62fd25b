"""Tether: an RLHF toolkit — preferences → SFT → reward model → PPO, with a gold score to
check that the policy really improved and did not just game its reward model.

Heavy libraries (transformers, peft) are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
