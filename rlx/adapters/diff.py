"""The weight update dW = W_after - W_before, per matrix: the one diff every consumer reads
(the spectral diagnostics, `rlx diagnose`, QuantLRM's importance).

`dtype` rounds both weights to a storage precision first (bf16: "did the stored weight change"),
the difference itself is always float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from rlx.errors import UserError


class WeightMismatch(UserError):
    """Two checkpoints that are not the same model: a matrix missing or of another shape."""


def weight_delta(
    before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """dW = after - before [O, I] in float32, both first rounded to `dtype` (None: as they are)."""
    if before.shape != after.shape:
        raise WeightMismatch(f"weight shapes differ: {tuple(before.shape)} vs {tuple(after.shape)}")
    if dtype is not None:
        before, after = before.to(dtype), after.to(dtype)
    return after.float() - before.float()


def matrix_names(weights: Mapping[str, torch.Tensor], target_modules=None) -> list[str]:
    """Names of the decoder layers' 2-D weights ("model.layers.3.mlp.up_proj.weight"), in order;
    with `target_modules`, only those whose module's last name part is listed."""
    names = []
    for name in weights:
        if (
            ".layers." not in name
            or not name.endswith(".weight")
            or len(_shape(weights, name)) != 2
        ):
            continue
        if target_modules is None or name.split(".")[-2] in target_modules:
            names.append(name)
    return names


def check_same_matrices(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], names: list[str]
) -> None:
    """Every name in both, with one shape: else one WeightMismatch line naming the first bad one."""
    for name in names:
        if name not in before or name not in after:
            side = "base" if name not in before else "fine-tuned"
            raise WeightMismatch(f"{name} is missing from the {side} model: not the same model")
        b, a = _shape(before, name), _shape(after, name)
        if b != a:
            raise WeightMismatch(
                f"{name}: base {tuple(b)} vs fine-tuned {tuple(a)}: not the same model"
            )


def weight_deltas(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    names: list[str] | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, dW) per matrix of `names` (default: matrix_names(before)), checked up front."""
    names = matrix_names(before) if names is None else names
    check_same_matrices(before, after, names)
    for name in names:
        yield name, weight_delta(before[name], after[name], dtype)


def _shape(weights: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A weight's shape without reading it where the mapping can (LazyWeights)."""
    shape = getattr(weights, "shape", None)
    return shape(name) if callable(shape) else tuple(weights[name].shape)


class LazyWeights(Mapping):
    """The tensors of an HF model folder's *.safetensors files, read one at a time on access."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise WeightMismatch(f"{folder} holds no *.safetensors weights")
        self._where = {}
        for file in files:
            with safe_open(file, "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                    self._where[key] = file
        self._shapes = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._where[name], "pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            with safe_open(self._where[name], "pt") as f:
                self._shapes[name] = tuple(f.get_slice(name).get_shape())
        return self._shapes[name]
