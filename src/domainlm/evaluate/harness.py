"""lm-evaluation-harness (EleutherAI, https://github.com/EleutherAI/lm-evaluation-harness) on the HF export.

The export at ``<run>/model/`` is a plain transformers folder, so the harness loads it unchanged with its ``hf``
model type. It is an optional extra (``pip install 'domainlm[harness]'``); nothing else in domainlm needs it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from domainlm.errors import UserError


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def command(model_dir: Path, tasks: str = "hellaswag,arc_easy", *, device: str = "cpu", batch_size: int = 8,
            output: Path | None = None, include_path: Path | None = None) -> str:
    """The shell command that runs the harness on an exported model (printed in docs/eval.md)."""
    args = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
            "--tasks", tasks, "--device", device, "--batch_size", str(batch_size)]
    if include_path is not None:
        args += ["--include_path", str(include_path)]
    if output is not None:
        args += ["--output_path", str(output)]
    return shlex.join(args)


def evaluate(model_dir: Path, tasks: list[str], *, include_path: Path | None = None, device: str = "cpu",
             batch_size: int = 8, limit: int | None = None) -> dict:
    """Run the harness in-process; returns its ``results`` mapping ({task: {metric: value}})."""
    if not available():
        raise UserError("lm-evaluation-harness is not installed; pip install 'domainlm[harness]'")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path)) if include_path is not None else TaskManager()
    out = simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks, task_manager=tm,
        device=device, batch_size=batch_size, limit=limit,
    )
    return out["results"]
