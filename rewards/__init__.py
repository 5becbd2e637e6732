"""Reward functions, one file per task family; load them with rlx.rewards.load_reward("file.py:fn")."""
