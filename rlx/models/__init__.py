"""Model names -> local folders, and loading a causal LM with its tokenizer.

Anywhere rlx takes a model it accepts the alias `smollm2` (the embedded default, converted on first
use), a local HF folder, or a hub id (for users with hub access: transformers and vLLM resolve it).
"""

from __future__ import annotations

from pathlib import Path

from rlx.errors import UserError
from rlx.models.smollm2 import fetch_smollm2

# Aliases for models rlx ships or builds itself: name -> function returning the local folder.
ALIASES = {"smollm2": fetch_smollm2}


class ModelError(UserError, FileNotFoundError):
    """A model name that is neither an alias, a model folder nor a hub id."""


def resolve_model(name: str) -> str:
    """Return a path or hub id that transformers and vLLM can load.

    An alias is fetched (and converted) on first use; a local folder must hold a config.json.
    Anything else is passed through as a hub id.
    """
    if name in ALIASES:
        return str(ALIASES[name]())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {path} has no config.json: pass an HF model folder "
                f"(save_pretrained output), a hub id, or one of the aliases {sorted(ALIASES)}"
            )
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(
            f"model folder {name} does not exist: pass an existing HF model folder, "
            f"a hub id like 'org/name', or one of the aliases {sorted(ALIASES)}"
        )
    return name


def load_model_and_tokenizer(name: str, dtype: str = "float32"):
    """Load an HF causal LM (eval mode) and its tokenizer from a model name, folder or alias."""
    # deferred: torch and transformers load with a model, so naming one stays instant (rlx CLI)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    model.eval()
    return model, tokenizer
