"""Atomic, resumable training checkpoints.

A checkpoint is a folder `<output_dir>/checkpoints/step-<N>/` holding the trainable weights
(`model/` as safetensors: the full model, or only the LoRA adapter), `optimizer.pt`,
`scheduler.pt`, `rng.pt` (python / numpy / torch generator states), `state.json` (step, data
position and anything else the loop needs) and, when the loop has some, `loop_tensors.pt` (its
tensor state, e.g. AdaLoRA's importance averages). It is written to a hidden temporary folder and
renamed into place, so a crash never leaves a half-written checkpoint under a real name.

Loading never runs code from the folder: weights are safetensors, and the `.pt` files are read with
`torch.load(weights_only=True)`, which accepts tensors and plain Python containers only (plus the
numpy array type of the RNG state). A file that needs more is refused with CheckpointError.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from rlx.errors import UserError

PREFIX = "step-"
LOOP_TENSORS = "loop_tensors.pt"


class CheckpointError(UserError):
    """A checkpoint to resume from is missing, incomplete, corrupt or unsafe to load."""


def _numpy_globals() -> list:
    """What unpickling numpy's RNG state needs: array reconstruction, no code execution."""
    from numpy._core.multiarray import _reconstruct

    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_pt(path: Path):
    """torch.load(weights_only=True) with one clear error for a missing, corrupt or unsafe file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only refuses
        first = str(err).strip().splitlines()[-1][:200]
        raise CheckpointError(f"{path}: refused, it holds more than tensors ({first})") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    """Every generator the loop draws from (vLLM in-process samples with torch's global one)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    output_dir, step: int, model, optimizer, scheduler, state: dict, tensors: dict | None = None
) -> Path:
    """Write checkpoint `step` atomically and return its folder. `model` is saved with
    save_pretrained (a peft model saves only its adapter); `tensors`: the loop's tensor state."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{PREFIX}{step:06d}-"))
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if tensors:
            torch.save(tensors, tmp / LOOP_TENSORS)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        old = None
        if final.exists():  # re-saving the same step (e.g. after a resume): swap, then remove
            old = final.rename(root / f".old-{final.name}-{tmp.name}")
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def find_checkpoint(output_dir, resume_from: str) -> Path:
    """`resume_from` is a checkpoint folder, or "latest" (the highest step in output_dir)."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not (path / "state.json").is_file():
            raise CheckpointError(
                f"resume_from={resume_from}: not a checkpoint folder (no state.json); give a "
                f"{checkpoint_root('<output_dir>')}/{PREFIX}<N> folder or resume_from=latest"
            )
        return path
    found = checkpoint_root(output_dir).glob(f"{PREFIX}*")
    steps = sorted((p for p in found if p.name[len(PREFIX) :].isdigit()), key=_step_of)
    if not steps:
        raise CheckpointError(
            f"resume_from=latest: no checkpoint in {checkpoint_root(output_dir)}; "
            "drop resume_from to start a new run"
        )
    return steps[-1]


def _load_sharded(path: Path, engine, scheduler, state: dict) -> dict:
    """Resume a DeepSpeed run (every rank): DeepSpeed's own loader for weights and optimizer
    state; it unpickles its files, so resume only from checkpoints you wrote."""
    if not hasattr(engine, "load_checkpoint") or not (path / "deepspeed").is_dir():
        raise CheckpointError(
            f"{path}: a DeepSpeed checkpoint resumes under the same DeepSpeed launch config, and "
            "a plain one without DeepSpeed; relaunch with the config the run was started with"
        )
    engine.load_checkpoint(str(path / "deepspeed"), tag="state")
    scheduler.load_state_dict(load_pt(path / "scheduler.pt"))
    set_rng_state(load_pt(path / "rng.pt"))
    return state


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states in place; return state.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({err})") from err
    if (path / "deepspeed").is_dir() or hasattr(model, "save_checkpoint"):
        return _load_sharded(path, model, scheduler, state)
    weights = path / "model"
    file = weights / "adapter_model.safetensors"
    if not file.exists():
        file = weights / "model.safetensors"
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, tensors)
    else:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise CheckpointError(
                f"checkpoint {path} does not match the model: missing {missing}, "
                f"unexpected {unexpected}"
            )
    optimizer.load_state_dict(load_pt(path / "optimizer.pt"))
    scheduler.load_state_dict(load_pt(path / "scheduler.pt"))
    set_rng_state(load_pt(path / "rng.pt"))
    return state


def load_loop_tensors(path: Path) -> dict:
    """The loop's tensor state saved with checkpoint `path` ({} when it saved none)."""
    return load_pt(path / LOOP_TENSORS) if (path / LOOP_TENSORS).is_file() else {}


def checkpoint(
    accelerator,
    output_dir,
    step: int,
    model,
    optimizer,
    scheduler,
    cfg,
    extra: dict | None = None,
    tensors: dict | None = None,
) -> None:
    """save_checkpoint on the main process (data position from `cfg.prompts_per_step`, plus the
    loop's `extra` state for state.json and its `tensors`), then a barrier so no rank runs ahead
    of a checkpoint being written. Under DeepSpeed every rank writes its shard of the weights and optimizer state
    (DeepSpeed's format, in `deepspeed/`)."""
    position = {"data_position": step * cfg.prompts_per_step, **(extra or {})}
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        save_sharded_checkpoint(accelerator, output_dir, step, model, scheduler, position, tensors)
    elif accelerator.is_main_process:
        save_checkpoint(output_dir, step, model, optimizer, scheduler, position, tensors)
    accelerator.wait_for_everyone()


def save_sharded_checkpoint(
    accelerator, output_dir, step: int, engine, scheduler, state: dict, tensors: dict | None = None
):
    """The DeepSpeed variant of save_checkpoint, written by every rank into one temporary folder
    that the main process renames into place once all ranks are done (a shared filesystem when
    the ranks are on several machines)."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-sharded"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")  # collective
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if tensors:
            torch.save(tensors, tmp / LOOP_TENSORS)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        old = final.rename(root / f".old-{final.name}-sharded") if final.exists() else None
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)


def save_final_model(model, tokenizer, folder: Path, state: dict | None = None) -> Path:
    """Weights (a peft adapter merged in) and tokenizer as a plain HF folder, loadable by
    transformers, vLLM and `rlx quantize`; written to a temporary folder, then renamed. `state`:
    the full weights when the model itself holds only a shard of them (ZeRO-3)."""
    from rlx.policy import export_weights  # the merged, HF-named weights the rollout engine gets

    state = dict(export_weights(model)) if state is None else state
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    base.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
