"""Learner math as pure functions: pg.py (GRPO / RLOO / REINFORCE family)."""
