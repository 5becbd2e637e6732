"""Atomic, resumable training checkpoints.

A checkpoint is a folder `<output_dir>/checkpoints/step-<N>/` holding the trainable weights
(`model/` as safetensors: the full model, or only the adapter, AdaLoRA's with every rank, the
pruned ones included), `optimizer.pt`, `scheduler.pt`, `rng.pt` (python / numpy / torch generator
states; `rng-rank<r>.pt` for each further rank, which restores its own), `state.json` (step, data
position, the number of processes and anything else the loop needs) and, when the loop has some,
`loop_tensors.pt` (its tensor state, e.g. AdaLoRA's importance averages and rank pattern). Under
DeepSpeed, `deepspeed/` holds every rank's shard and `deepspeed_files.json` lists them with their
sizes, so a resume with a shard missing or cut short stops with one line naming it instead of
going on with a fresh optimizer. It is written to a hidden temporary folder and renamed into
place, so a crash never leaves a half-written checkpoint under a real name.

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
from numpy._core.multiarray import _reconstruct
from safetensors import SafetensorError
from safetensors.torch import load_file

from rlx.adapters import saving_every_rank
from rlx.errors import UserError
from rlx.policy import export_weights

PREFIX = "step-"
LOOP_TENSORS = "loop_tensors.pt"
SHARD_LIST = "deepspeed_files.json"


def rng_file(rank: int) -> str:
    """The RNG state file of trainer rank `rank` (rank 0's keeps the single-process name)."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


class CheckpointError(UserError):
    """A checkpoint to resume from is missing, incomplete, corrupt or unsafe to load."""


def _numpy_globals() -> list:
    """What unpickling numpy's RNG state needs: array reconstruction, no code execution."""
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
    output_dir,
    step: int,
    model,
    optimizer,
    scheduler,
    state: dict,
    tensors: dict | None = None,
    staged: Path | None = None,
) -> Path:
    """Write checkpoint `step` atomically and return its folder. `model` is saved with
    save_pretrained (a peft model saves only its adapter); `tensors`: the loop's tensor state.
    `staged`: the temporary folder the other ranks have already written their files into (their
    RNG states, DeepSpeed's shards); `model` and `optimizer` are None when DeepSpeed saved them."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = staged or Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{PREFIX}{step:06d}-"))
    try:
        if model is not None:
            with saving_every_rank(model):  # AdaLoRA: the pruned ranks too (a fresh model loads it)
                model.save_pretrained(tmp / "model", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / rng_file(0))
        if tensors:
            torch.save(tensors, tmp / LOOP_TENSORS)
        if (tmp / "deepspeed").is_dir():
            shards = tmp / "deepspeed"
            sizes = {
                str(f.relative_to(shards)): f.stat().st_size
                for f in sorted(shards.rglob("*"))
                if f.is_file()
            }
            (tmp / SHARD_LIST).write_text(json.dumps(sizes, indent=1))
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


def _load_sharded(path: Path, ds_engine, scheduler, state: dict, rank: int) -> dict:
    """Resume a DeepSpeed run (every rank): DeepSpeed's own loader for weights and optimizer
    state; it unpickles its files, so resume only from checkpoints you wrote. DeepSpeed goes on
    with a fresh optimizer when a shard is missing, so every rank first checks every shard
    against the checkpoint's list: all ranks reach the same verdict without a collective."""
    if not hasattr(ds_engine, "load_checkpoint") or not (path / "deepspeed").is_dir():
        raise CheckpointError(
            f"{path}: a DeepSpeed checkpoint resumes under the same DeepSpeed launch config, and "
            "a plain one without DeepSpeed; relaunch with the config the run was started with"
        )
    check_shards(path)
    rng = rank_rng_file(path, rank, state)
    try:
        loaded, _ = ds_engine.load_checkpoint(str(path / "deepspeed"), tag="state")
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path / 'deepspeed'}: unreadable ({str(err)[:200]})") from err
    if loaded is None:
        raise CheckpointError(f"{path / 'deepspeed'}: DeepSpeed found no checkpoint to load")
    scheduler.load_state_dict(load_pt(path / "scheduler.pt"))
    set_rng_state(load_pt(rng))
    return state


def check_shards(path: Path) -> None:
    """Every file DeepSpeed wrote is there at its size (checkpoints written before the list was
    kept are left to DeepSpeed's own checks)."""
    listing = path / SHARD_LIST
    if not listing.is_file():
        return
    for name, size in json.loads(listing.read_text()).items():
        file = path / "deepspeed" / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"{file}: {file.stat().st_size} bytes where {size} were written; the checkpoint "
                "is damaged"
            )


def rank_rng_file(path: Path, rank: int, state: dict) -> Path:
    """This rank's RNG state file, with one clear error for a resume on more processes."""
    file = path / rng_file(rank)
    saved = state.get("world_size", 1)
    if rank >= saved:
        raise CheckpointError(
            f"{path} was written by {saved} process(es) and holds no state for rank {rank}: "
            "resume with the launch config the run was started with"
        )
    return file


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and RNG states in place (`rank`: this trainer
    process's, whose own RNG state is restored); return state.json."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({err})") from err
    if (path / "deepspeed").is_dir() or hasattr(model, "save_checkpoint"):
        return _load_sharded(path, model, scheduler, state, rank)
    weights = path / "model"
    file = weights / "adapter_model.safetensors"
    if not file.exists():
        file = weights / "model.safetensors"
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict  # deferred: peft imports transformers

        try:
            set_peft_model_state_dict(model, tensors)
        except RuntimeError as err:
            if "size mismatch" not in str(err):
                raise
            raise CheckpointError(adapter_mismatch(weights, err)) from None
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
    set_rng_state(load_pt(rank_rng_file(path, rank, state)))
    return state


def adapter_mismatch(weights: Path, err: RuntimeError) -> str:
    """One message for an adapter checkpoint whose tensor shapes are not the model's."""
    first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
    try:
        pruned = json.loads((weights / "adapter_config.json").read_text()).get("rank_pattern")
    except (OSError, ValueError):
        pruned = None
    if pruned:
        return (
            f"{weights}: an AdaLoRA adapter saved with its pruned ranks dropped (by rlx before "
            "it kept every rank in checkpoints, or by PEFT's own save_pretrained), which does "
            "not load into the full-rank model a resumed run builds; start the run again, or "
            f"resume from a checkpoint written before AdaLoRA pruned ({first})"
        )
    return (
        f"{weights}: the adapter's shapes are not the model's ({first}); resume with the "
        "adapter settings (method, rank, target modules) the run was started with"
    )


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
    """Checkpoint `step` on every process (data position from `cfg.prompts_per_step`, the number
    of processes, the loop's `extra` state for state.json and its `tensors`). Each rank writes its
    RNG state and, under DeepSpeed, its shard of the weights and optimizer state (DeepSpeed's
    format, in `deepspeed/`) into one temporary folder; the main process adds the rest and renames
    it into place once all are done (a shared filesystem when the ranks are on several machines).
    Barriers around it: no rank runs ahead of a checkpoint being written."""
    world, rank = accelerator.num_processes, accelerator.process_index
    state = {"data_position": step * cfg.prompts_per_step, "world_size": world, **(extra or {})}
    sharded = getattr(accelerator.state, "deepspeed_plugin", None) is not None
    if world == 1 and not sharded:
        save_checkpoint(output_dir, step, model, optimizer, scheduler, state, tensors)
        return
    staged = checkpoint_root(output_dir) / f".tmp-{PREFIX}{step:06d}-ranks"
    if accelerator.is_main_process:
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
    accelerator.wait_for_everyone()
    if rank:
        torch.save(rng_state(), staged / rng_file(rank))
    if sharded:
        model.save_checkpoint(str(staged / "deepspeed"), tag="state")  # collective
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = (None, None) if sharded else (model, optimizer)
        save_checkpoint(output_dir, step, *weights, scheduler, state, tensors, staged=staged)
    accelerator.wait_for_everyone()


def save_final_model(model, tokenizer, folder: Path, state: dict | None = None) -> Path:
    """Weights (a peft adapter merged in) and tokenizer as a plain HF folder, loadable by
    transformers, vLLM and `rlx quantize`; written to a temporary folder, then renamed. `state`:
    the full weights when the model itself holds only a shard of them (ZeRO-3)."""
    if state is None:  # the merged, HF-named weights the rollout engine gets
        state = dict(export_weights(model))
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    base.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
