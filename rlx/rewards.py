"""Load reward functions from "file.py:function" specs and score completions with them.

`resolve_rewards` picks a run's reward functions (configured, or the task's defaults) and
`score_rollout` scores a rollout's completions with their dataset rows' columns.

Reward functions follow TRL's contract: ``fn(prompts, completions, **dataset_columns)`` returns one
``float | None`` per completion, where None means "this reward does not apply to this sample".
``score_completions`` calls every function once per batch, checks what it returned, and turns the
answers into a float64 matrix with NaN for None, plus a weighted total per sample.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from rlx.errors import UserError
from rlx.tasks import TASKS, TaskError

if TYPE_CHECKING:  # annotations only: the reward layer does not load the rollout engines
    from rlx.rollout import Completion

# "rewards/arithmetic.py:correctness" must work from any cwd, so relative files also resolve here.
REPO_ROOT = Path(__file__).resolve().parent.parent

# Arguments score_completions passes itself; a dataset column with one of these names would clash.
RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids")

_file_modules: dict[Path, ModuleType] = {}


class RewardError(UserError, ValueError):
    """A reward spec could not be loaded, or a reward function misbehaved."""


@dataclass
class RewardFunction:
    """A loaded reward function and the weight of its score in the total."""

    name: str
    """Shown in logs and error messages, e.g. "correctness"."""
    fn: Callable[..., Sequence[float | None]]
    """TRL-style reward function: fn(prompts, completions, **columns) -> list[float | None]."""
    weight: float = 1.0
    """Multiplies this function's score in RewardScores.total."""

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise RewardError(f"reward {self.name!r}: fn is not callable ({self.fn!r})")
        if not _is_number(self.weight) or not math.isfinite(self.weight):
            raise RewardError(
                f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}"
            )


@dataclass
class RewardScores:
    """Scores of N completions under K reward functions."""

    per_function: np.ndarray
    """[N, K] float64, NaN where a function returned None for that sample."""
    names: list[str]
    """K function names, in column order of per_function."""
    total: np.ndarray
    """[N] weighted sum over functions, None counted as 0; NaN when every function returned None."""


def completion_text(completion: Any) -> str:
    """Return the text of one completion, plain or in TRL's conversational form.

    Conversational completions are lists of {"role", "content"} messages; the last message is the
    one the policy just generated, so its content is the text to score.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list | tuple) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    if isinstance(completion, list | tuple) and not completion:
        return ""
    raise TypeError(
        f"completion must be a string or a list of messages, got {type(completion).__name__}"
    )


def load_reward(spec: str) -> Callable[..., Sequence[float | None]]:
    """Load a reward function from "path/to/file.py:function" or "dotted.module:function".

    Relative file paths are tried against the cwd first, then against the repository root, so the
    shipped rewards ("rewards/arithmetic.py:correctness") load from anywhere. Raises RewardError.
    """
    target, colon, fn_name = spec.rpartition(":")
    if not colon or not target.strip() or not fn_name.strip():
        raise RewardError(
            f"reward spec {spec!r} is malformed: expected 'path/to/file.py:function' "
            "or 'dotted.module:function'"
        )
    target, fn_name = target.strip(), fn_name.strip()
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file_module(target)
        where = f"file {module.__file__}"
    else:
        module = _import_dotted_module(target)
        where = f"module {target}"
    if not hasattr(module, fn_name):
        available = ", ".join(_callables_defined_in(module)) or "none"
        raise RewardError(
            f"reward spec {spec!r}: {where} has no function {fn_name!r}; "
            f"callables defined there: {available}"
        )
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise RewardError(
            f"reward spec {spec!r}: {fn_name!r} in {where} is a {type(fn).__name__}, not a function"
        )
    return fn


def score_completions(
    reward_fns: list[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: dict[str, Sequence[Any]],
    completion_ids: Sequence[Sequence[int]] | None = None,
) -> RewardScores:
    """Score N completions with every reward function and combine them by weight.

    `columns` are the dataset columns for these N samples (e.g. {"answer": [...]}); each function is
    called as fn(prompts=..., completions=..., completion_ids=..., **columns), the completion_ids
    argument only when it is given. Any misbehaviour raises one RewardError naming the function.
    """
    if not reward_fns:
        raise RewardError("score_completions needs at least one reward function")
    n = len(completions)
    _check_batch(prompts, columns, completion_ids, n)
    kwargs: dict[str, Any] = dict(columns)
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids

    per_function = np.empty((n, len(reward_fns)), dtype=np.float64)  # [N, K]
    for k, reward in enumerate(reward_fns):
        try:
            values = reward.fn(prompts=prompts, completions=completions, **kwargs)
        except Exception as err:
            raise RewardError(
                f"reward function {reward.name!r} raised {type(err).__name__}: {err}; "
                "fix the function or the dataset columns it reads"
            ) from err
        per_function[:, k] = _checked_values(reward.name, values, n)

    weights = np.array([reward.weight for reward in reward_fns], dtype=np.float64)  # [K]
    total = np.nansum(per_function * weights, axis=1)  # [N]
    total[np.isnan(per_function).all(axis=1)] = np.nan
    return RewardScores(
        per_function=per_function, names=[reward.name for reward in reward_fns], total=total
    )


def _check_batch(
    prompts: Sequence[Any],
    columns: dict[str, Sequence[Any]],
    completion_ids: Sequence[Sequence[int]] | None,
    n: int,
) -> None:
    """Reject batches whose prompts, columns or completion_ids do not line up with completions."""
    if len(prompts) != n:
        raise RewardError(
            f"got {len(prompts)} prompts for {n} completions; pass one per completion"
        )
    if completion_ids is not None and len(completion_ids) != n:
        raise RewardError(f"got {len(completion_ids)} completion_ids for {n} completions")
    for name, values in columns.items():
        if name in RESERVED_ARGUMENTS:
            raise RewardError(f"dataset column {name!r} clashes with a reward argument; rename it")
        if len(values) != n:
            raise RewardError(f"column {name!r} has {len(values)} values for {n} completions")


def _checked_values(name: str, values: Any, n: int) -> list[float]:
    """Validate one function's return value and convert it to floats, NaN standing for None."""
    where = f"reward function {name!r}"
    if not isinstance(values, list | tuple):
        raise RewardError(
            f"{where} returned {type(values).__name__}; it must return a list of float | None"
        )
    if len(values) != n:
        raise RewardError(
            f"{where} returned {len(values)} values, expected {n} (one per completion)"
        )
    checked = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(math.nan)
            continue
        if isinstance(value, bool | np.bool_):
            # True/False usually means a predicate was returned by mistake; make the author say 1.0.
            raise RewardError(
                f"{where} returned bool {value!r} at index {i}; return 1.0/0.0 instead of a bool"
            )
        if not _is_number(value):
            raise RewardError(
                f"{where} returned a non-numeric value at index {i}: {value!r} "
                f"({type(value).__name__}); return float or None"
            )
        if not math.isfinite(value):
            raise RewardError(
                f"{where} returned {value!r} at index {i}; return None to skip a sample, not NaN/inf"
            )
        checked.append(float(value))
    return checked


def _is_number(value: Any) -> bool:
    """True for real numbers (Python or NumPy), False for bools and everything else."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _load_file_module(target: str) -> ModuleType:
    """Import a .py file once, under a module name unique to its resolved path."""
    path = _resolve_reward_file(target)
    if path in _file_modules:
        return _file_modules[path]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"rlx_reward_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"reward file {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running so dataclasses and pickling inside the file can find the module.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise RewardError(
            f"importing reward file {path} failed: {type(err).__name__}: {err}"
        ) from err
    _file_modules[path] = module
    return module


def _resolve_reward_file(target: str) -> Path:
    """Find a reward file: as given (absolute or cwd-relative), then relative to the repo root."""
    given = Path(target).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, REPO_ROOT / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise RewardError(f"reward file {target!r} not found (tried {tried})")


def _import_dotted_module(target: str) -> ModuleType:
    """Import "package.module", turning any failure into a RewardError."""
    try:
        return importlib.import_module(target)
    except Exception as err:
        raise RewardError(
            f"importing reward module {target!r} failed: {type(err).__name__}: {err}"
        ) from err


def _callables_defined_in(module: ModuleType) -> list[str]:
    """Public functions and callables defined in the module itself, not the ones it imports."""
    return sorted(
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and callable(obj)
        and not inspect.isclass(obj)
        and getattr(obj, "__module__", None) == module.__name__
    )


def load_reward_functions(specs: Sequence[tuple[str, float]]) -> list[RewardFunction]:
    """Load (spec, weight) pairs into RewardFunctions named after their functions."""
    loaded = []
    for spec, weight in specs:
        fn = load_reward(spec)
        loaded.append(RewardFunction(name=getattr(fn, "__name__", spec), fn=fn, weight=weight))
    return loaded


def resolve_rewards(task_name: str, reward_cfgs) -> list[RewardFunction]:
    """The configured rewards (rlx.config.RewardConfig list), else the task's default rewards."""
    if reward_cfgs:
        weights = [r.weight for r in reward_cfgs]
        if not sum(weights) > 0:
            raise RewardError(
                f"reward weights {weights} sum to {sum(weights)}: they must sum to a positive "
                "number (give the rewards you want to raise positive weights)"
            )
        return load_reward_functions([(r.func, r.weight) for r in reward_cfgs])
    if task_name in TASKS:
        return load_reward_functions(TASKS[task_name].default_rewards)
    raise TaskError(
        f"{task_name} is user data with no default rewards: name them, e.g. "
        "rewards='[{func: rewards/arithmetic.py:correctness, weight: 1.0}]'"
    )


def score_rollout(dataset, completions: list[Completion], reward_fns) -> RewardScores:
    """Score completions, passing each completion its prompt and its row's dataset columns."""
    rows = [c.prompt_index for c in completions]
    columns = {
        name: [dataset[name][i] for i in rows] for name in dataset.column_names if name != "prompt"
    }
    prompts = [dataset["prompt"][i] for i in rows]
    return score_completions(
        reward_fns,
        prompts=prompts,
        completions=[c.text for c in completions],
        columns=columns,
        completion_ids=[c.token_ids for c in completions],
    )
