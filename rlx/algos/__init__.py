"""Learner math as pure functions: pg.py (GRPO / RLOO / REINFORCE family) and eggroll.py (EGGROLL
low-rank evolution strategies: seeded noise, fitness shaping, the update)."""
