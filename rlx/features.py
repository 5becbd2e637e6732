"""Named points of a training loop where research features plug in.

A loop calls each point once per step, on every rank, whether or not any feature is installed;
the loop works the same with none. A feature overrides the points it needs:

    after_rewards(step)     the step's gathered rewards and their weights may change
                            (dynamic reward weighting: rlx/weighting.py)
    after_advantages(step)  the step's advantages may change, or its optimizer's learning rate
                            (the hypervolume meta-reward)
    after_step(n)           after step n's update and sync: its metrics for the row of step n
                            (the adapter's hook time and spectral diagnostics, validation points)
    state()                 JSON-able state for the checkpoint's state.json
    tensors()               tensor state for the checkpoint's loop_tensors.pt (called only when
                            a checkpoint is written)

`step` is the loop's record of the step (recipes/pg.py: ScoredStep); a feature reads and writes
the fields its docstring names. Resuming is the feature's own business, at its construction.
"""

from __future__ import annotations


class Feature:
    """A research feature of the loop: every point does nothing until overridden."""

    def after_rewards(self, step) -> None:
        return None

    def after_advantages(self, step) -> None:
        return None

    def after_step(self, step: int) -> dict:
        return {}

    def state(self) -> dict:
        return {}

    def tensors(self) -> dict:
        return {}


class Features(Feature):
    """The installed features (None entries are left out), called in order at each point."""

    def __init__(self, features):
        self.features = [f for f in features if f is not None]

    def after_rewards(self, step) -> None:
        for feature in self.features:
            feature.after_rewards(step)

    def after_advantages(self, step) -> None:
        for feature in self.features:
            feature.after_advantages(step)

    def after_step(self, step: int) -> dict:
        return {k: v for feature in self.features for k, v in feature.after_step(step).items()}

    def state(self) -> dict:
        return {k: v for feature in self.features for k, v in feature.state().items()}

    def tensors(self) -> dict:
        return {k: v for feature in self.features for k, v in feature.tensors().items()}
