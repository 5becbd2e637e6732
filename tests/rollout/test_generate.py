"""`rlx generate` end to end on a tiny model: engine -> rewards -> summary -> files, and its errors."""

from __future__ import annotations

import json

import pytest

from rlx.cli import main
from rlx.cli.generate import run_generate
from rlx.config import GenerateConfig, load_config


def _config(model: str, out, backend: str, **extra) -> GenerateConfig:
    overrides = [
        f"model.name={model}",
        f"rollout.backend={backend}",
        "rollout.num_samples=2",
        "rollout.max_new_tokens=8",
        "rollout.dtype=float32",
        "task.num_prompts=3",
        f"output_dir={out}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(GenerateConfig, overrides=overrides)


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_generate_writes_scored_completions(tiny_llama, tmp_path, backend):
    summary = run_generate(_config(tiny_llama, tmp_path, backend))
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [r["prompt_index"] for r in rows] == [0, 0, 1, 1, 2, 2]
    for r in rows:
        assert set(r["rewards"]) == {"correctness", "answer_format"}
        assert len(r["token_ids"]) == len(r["logprobs"]) <= 8
        # the weighted total is recomputed from the per-function rewards and the task's weights
        expected = 0.8 * (r["rewards"]["correctness"] or 0) + 0.2 * (
            r["rewards"]["answer_format"] or 0
        )
        assert r["reward"] == pytest.approx(expected)
    assert summary["num_completions"] == 6
    assert summary["reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / 6)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "model:" in (tmp_path / "config.yaml").read_text()


def test_generate_with_custom_reward_file(tiny_llama, tmp_path):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(
        "def always_half(prompts, completions, **kw):\n    return [0.5] * len(completions)\n"
    )
    rewards = f"[{{func: '{reward_file}:always_half', weight: 2.0}}]"
    summary = run_generate(_config(tiny_llama, tmp_path / "out", "hf", rewards=rewards))
    assert summary["rewards"] == {"always_half": 0.5}
    assert summary["reward_mean"] == pytest.approx(1.0)


def test_cli_reports_bad_input_in_one_line(tiny_llama, tmp_path, capsys):
    assert main(["generate", "rollout.temprature=0.5"]) == 2
    assert "did you mean 'rollout.temperature'" in capsys.readouterr().err
    assert main(["generate", f"model.name={tiny_llama}", "task.name=no_such_task"]) == 2
    assert "neither a registered task" in capsys.readouterr().err
    missing = f"rewards=[{{func: '{tmp_path}/nope.py:f'}}]"
    assert main(["generate", f"model.name={tiny_llama}", missing]) == 2
    err = capsys.readouterr().err
    assert "nope.py" in err and err.count("\n") == 1


def test_cli_show_config_lists_knobs(capsys):
    assert main(["generate", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "rollout.num_samples" in out and "task.name" in out
