"""Every bad input ends with exit status 2 and one line `<command>: error: ...` on stderr, and
nothing already in an output_dir (checkpoints, metrics) is damaged.

Most cases run in-process through each command's main(argv); those in SUBPROCESS also run as
real processes. A finished one-step PG run is the output_dir most PG cases point at (resuming
it), so that a case which wrote anything there would show in the before/after hashes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlx.cli import main as rlx_main

ROOT = Path(__file__).resolve().parents[2]


def _recipe_main(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


PG_MAIN, ES_MAIN = _recipe_main("pg"), _recipe_main("es")
COMMANDS = {"pg": PG_MAIN, "es": ES_MAIN, "rlx": rlx_main}
SUBPROCESS = {"pg-unknown-key", "pg-missing-model", "pg-pickle-payload", "es-missing-reward-fn"}
SUBPROCESS |= {"rlx-generate-missing-data", "rlx-quantize-missing-model"}


class Payload:
    """Unpickling this runs code: writes a marker file. A safe loader must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the payload ran"))


@pytest.fixture(scope="module")
def world(tiny_llama, tmp_path_factory):
    """Data files, reward files, a finished run, and broken copies of its checkpoint."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "empty.jsonl").write_text("")
    (root / "no_prompt.jsonl").write_text('{"question": "1+1"}\n{"question": "2+2"}\n')
    (root / "good.jsonl").write_text("".join(f'{{"prompt": "say {i}"}}\n' for i in range(8)))
    (root / "rewards.py").write_text(
        "def ok(prompts, completions, **kw):\n"
        "    return [1.0 if len(c) % 2 else 0.0 for c in completions]\n"
        "def boom(prompts, completions, **kw):\n"
        "    raise RuntimeError('boom')\n"
        "def short(prompts, completions, **kw):\n"
        "    return [1.0]\n"
    )
    (root / "empty_dir").mkdir()
    (root / "a_file").write_text("not a folder")
    run = root / "run"
    code = PG_MAIN([*pg_args(tiny_llama, root, run), "steps=1"])
    assert code == 0 and (run / "checkpoints").is_dir()
    for name, breakage in (("corrupt", "optimizer.pt"), ("payload", "rng.pt")):
        copy = root / name
        shutil.copytree(run, copy)
        (ckpt,) = (copy / "checkpoints").iterdir()
        if name == "corrupt":
            (ckpt / breakage).write_bytes(b"\x00not a torch file")
        else:
            with (ckpt / breakage).open("wb") as f:
                pickle.dump(Payload(str(root / "payload_ran")), f)
    return root


def _common(model: str, root: Path, out: Path) -> list[str]:
    argv = [f"model.name={model}", f"task.name={root / 'good.jsonl'}", "rollout.backend=hf"]
    argv += ["rollout.max_new_tokens=4", "prompts_per_step=2", "eval.enabled=false", "log_with=[]"]
    return argv + [f"output_dir={out}", f"rewards=[{{func: '{root / 'rewards.py'}:ok'}}]"]


def pg_args(model: str, root: Path, out: Path) -> list[str]:
    return _common(model, root, out) + ["rollout.num_samples=2", "steps=2"]


def es_args(model: str, root: Path, out: Path) -> list[str]:
    return _common(model, root, out) + ["es.population_size=4", "steps=1"]


RESUME = "resume the finished run"
GRADIENT, HYPERVOLUME = "weighting.method=gradient", "weighting.method=hypervolume"
TWO = "rewards=[{{func: '{root}/rewards.py:ok'}}, {{func: '{root}/rewards.py:ok'}}]"
TWO_NEGATIVE = TWO.replace(":ok'}}]", ":ok', weight: -0.5}}]")
# (case, command, arguments after the command's base ones, a phrase of the error line). In the
# arguments, {root} is the fixture folder, {model} the tiny model; reward=NAME picks a function
# of {root}/rewards.py, out=NAME an output_dir under {root}, RESUME resumes {root}/run.
CASES = [
    ("pg-unknown-key", "pg", ["optim.lrr=1"], "did you mean 'optim.lr'"),
    ("pg-bad-value", "pg", ["steps=0"], "steps must be >= 1"),
    ("pg-old-lora-key", "pg", ["lora.enabled=true"], "use adapter.method=lora"),
    ("pg-old-weighting-key", "pg", ["algo.reward_weighting=gradient"], "use weighting.method"),
    ("pg-missing-config-file", "pg", ["--config", "{root}/nope.yaml"], "config file not found"),
    ("pg-missing-dataset", "pg", ["task.name={root}/nope.jsonl", RESUME], "nor an existing"),
    ("pg-empty-dataset", "pg", ["task.name={root}/empty.jsonl", RESUME], "empty"),
    ("pg-no-prompt-column", "pg", ["task.name={root}/no_prompt.jsonl", RESUME], "no 'prompt'"),
    ("pg-missing-reward-file", "pg", ["reward_file=nope.py", RESUME], "nope.py"),
    ("pg-missing-reward-fn", "pg", ["reward=nope", RESUME], "nope"),
    ("pg-reward-raises", "pg", ["reward=boom", RESUME], "boom"),
    ("pg-reward-weights-sum-to-zero", "pg", ["reward_weight=0", RESUME], "sum to a positive"),
    ("pg-reward-wrong-length", "pg", ["reward=short", RESUME], "short"),
    ("pg-missing-model", "pg", ["model.name={root}/nope_model", RESUME], "does not exist"),
    ("pg-model-without-config", "pg", ["model.name={root}/empty_dir", RESUME], "no config.json"),
    ("pg-long-prompts", "pg", ["max_prompt_tokens=1", RESUME], "max_prompt_tokens"),
    ("pg-no-checkpoint", "pg", ["out=fresh", "resume_from=latest"], "no checkpoint"),
    ("pg-not-a-checkpoint", "pg", ["out=run", "resume_from={root}"], "not a checkpoint folder"),
    ("pg-corrupt-checkpoint", "pg", ["out=corrupt", "resume_from=latest"], "optimizer.pt"),
    ("pg-pickle-payload", "pg", ["out=payload", "resume_from=latest"], "rng.pt: refused"),
    ("pg-gradient-one-objective", "pg", [GRADIENT, RESUME], "needs 2 or more rewards"),
    ("pg-hypervolume-one-objective", "pg", [HYPERVOLUME, RESUME], "2 or 3 reward functions"),
    ("pg-hypervolume-without-eval", "pg", [TWO, HYPERVOLUME, RESUME], "eval.enabled=true"),
    ("pg-grad-lambda-zero", "pg", ["weighting.grad_lambda=0"], "grad_lambda must be"),
    ("pg-grad-layers-negative", "pg", ["weighting.grad_layers=[-1]"], "grad_layers must be"),
    (
        "pg-grad-layers-beyond-the-model",
        "pg",
        [TWO, GRADIENT, "weighting.grad_layers=[5]", RESUME],
        "the model has 2 layers",
    ),
    ("pg-dynamic-negative-weight", "pg", [TWO_NEGATIVE, GRADIENT, RESUME], "must be >= 0"),
    ("pg-output-dir-is-a-file", "pg", ["out=a_file"], "is a file"),
    ("pg-output-dir-holds-a-run", "pg", ["out=run"], "already holds a run"),
    ("es-unknown-key", "es", ["es.sigmaa=1"], "es.sigma"),
    ("es-missing-model", "es", ["model.name={root}/nope_model"], "does not exist"),
    ("es-no-prompt-column", "es", ["task.name={root}/no_prompt.jsonl"], "no 'prompt'"),
    ("es-missing-reward-fn", "es", ["reward=nope"], "nope"),
    ("es-output-dir-holds-a-run", "es", ["out=run"], "already holds a run"),
    ("rlx-generate-missing-model", "rlx", ["generate", "model.name={root}/nope"], "does not exist"),
    (
        "rlx-generate-missing-data",
        "rlx",
        ["generate", "model.name={model}", "task.name={root}/x.jsonl"],
        "nor an existing",
    ),
    ("rlx-quantize-missing-model", "rlx", ["quantize", "--base", "{root}/nope"], "nope"),
    ("rlx-eval-missing-model", "rlx", ["eval", "--model", "{root}/nope_model"], "nope_model"),
]


def build_argv(prog: str, extra: list[str], model: str, root: Path) -> list[str]:
    """The command line of one case: the command's base arguments, then the case's."""
    argv = {"pg": pg_args, "es": es_args}[prog](model, root, root / "x") if prog != "rlx" else []
    for arg in extra:
        if arg == RESUME:
            argv += [f"output_dir={root / 'run'}", "resume_from=latest"]
        elif arg.startswith("out="):
            argv.append(f"output_dir={root / arg[4:]}")
        elif arg.startswith("reward_weight="):
            argv.append(f"rewards=[{{func: '{root / 'rewards.py'}:ok', weight: {arg[14:]}}}]")
        elif arg.startswith(("reward=", "reward_file=")):
            file, fn = (
                ("nope.py", "ok") if arg.startswith("reward_file=") else ("rewards.py", arg[7:])
            )
            argv.append(f"rewards=[{{func: '{root / file}:{fn}'}}]")
        else:
            argv.append(arg.format(root=root, model=model))
    if argv[:1] == ["quantize"]:
        argv += ["--finetuned", model, "--out", str(root / "q")]
    return argv


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every checkpoint and metrics file of the runs under root."""
    runs = [p for p in root.rglob("*") if p.is_file() and p.suffix != ".py"]
    kept = [p for p in runs if "checkpoints" in p.parts or p.name == "metrics.jsonl"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in kept}


def check_one_line(err: str, prog: str, expected: str) -> None:
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err[-2000:]
    assert err.rstrip().splitlines()[-1] == lines[0]  # the last thing said
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case,prog,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, prog, extra, expected, world, tiny_llama, capsys):
    before = snapshot(world)
    assert COMMANDS[prog](build_argv(prog, extra, tiny_llama, world)) == 2
    check_one_line(capsys.readouterr().err, prog, expected)
    assert snapshot(world) == before
    assert not (world / "payload_ran").exists()


SUBPROCESS_CASES = [c for c in CASES if c[0] in SUBPROCESS]


@pytest.mark.parametrize("case,prog,extra,expected", SUBPROCESS_CASES, ids=sorted(SUBPROCESS))
def test_bad_input_as_a_real_process(case, prog, extra, expected, world, tiny_llama):
    before = snapshot(world)
    entry = {"pg": ["recipes/pg.py"], "es": ["recipes/es.py"], "rlx": ["-m", "rlx.cli"]}[prog]
    env = {k: v for k, v in os.environ.items() if k != "RLX_DEBUG"}
    argv = [sys.executable, *entry, *build_argv(prog, extra, tiny_llama, world)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    check_one_line(proc.stderr, prog, expected)
    assert snapshot(world) == before
    assert not (world / "payload_ran").exists()


def test_debug_shows_the_traceback_and_internal_errors_keep_theirs(world, tiny_llama, monkeypatch):
    argv = [*pg_args(tiny_llama, world, world / "x"), f"model.name={world / 'nope_model'}"]
    monkeypatch.setenv("RLX_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PG_MAIN(argv)
    monkeypatch.delenv("RLX_DEBUG")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PG_MAIN(["--debug", *argv])

    import rlx.policy

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(rlx.policy, "load_policy", broken)
    main = _recipe_main("pg")  # re-imports load_policy from the patched module
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(pg_args(tiny_llama, world, world / "internal"))
