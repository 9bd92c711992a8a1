"""One owner for the run directory's names (rundir.py): the child runs (variants, scaling points, decide arms,
fine-tunings) are made by `RunDir.child`, "run directory or model folder?" is answered by `resolve_model_ref`,
no run-directory name is spelled anywhere else in src/, and every JSON output has a model (outputs.py)."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest

from domainlm import outputs, pipeline
from domainlm.errors import UserError
from domainlm.rundir import RunDir, resolve_model_ref
from outputs_check import check_outputs

SRC = Path(__file__).resolve().parent.parent / "src" / "domainlm"

# ------------------------------------------------------------------------------------------------ names spelled once


def _run_dir_names() -> set[str]:
    """Every file and folder name of a run directory: the path components of RunDir's constants."""
    names = set()
    for key, value in vars(RunDir).items():
        if key.isupper() and isinstance(value, str) and key != "SEED_SUFFIX":
            names.update(value.split("/"))
    return names


NAMES = _run_dir_names()
# A dotted or multi-part name (plan.json, eval/eval.json) is a path wherever it stands; a plain word (model, data,
# tokens, eval) is also a JSON key, a stage or a command name, so it counts only where a path is built.
PATH_CALLS = {"Path", "PurePath", "joinpath", "with_name"}


def _literal_parts(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def _is_run_dir_name(text: str) -> bool:
    return any(part in NAMES or part.startswith(f"{RunDir.TOKENS}-") for part in text.split("/"))


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def spelled_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, literal) of every run-directory name spelled in ``tree``: in a path (an operand of ``/``, an
    argument of Path()/joinpath()/with_name()), or a dotted/multi-part name (``"eval.json"``) anywhere but a
    docstring."""
    found, docs = [], _docstrings(tree)
    for node in ast.walk(tree):
        operands = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = [node.left, node.right]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in PATH_CALLS:
                operands = list(node.args)
        for op in operands:
            found += [(node.lineno, text) for text in _literal_parts(op) if _is_run_dir_name(text)]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in NAMES and ("." in node.value or "/" in node.value):
                found.append((node.lineno, node.value))
    return sorted(set(found))


def test_the_check_finds_what_it_looks_for():
    tree = ast.parse('"""eval/eval.json in a docstring is prose."""\n'
                     'a = run / "ablate" / f"w{w:g}"\nb = Path("decide", arm)\nc = {"model": 1, "tokens": 2}\n'
                     'd = "plan.json"\ne = out.with_name(f"tokens-{sha}")\nf = x / "notes.txt"\n')
    assert spelled_names(tree) == [(2, "ablate"), (3, "decide"), (5, "plan.json"), (6, "tokens-")]


def test_no_run_directory_name_is_spelled_outside_rundir():
    where = []
    for f in sorted(SRC.rglob("*.py")):
        if f.name == "rundir.py":
            continue
        where += [f"{f.relative_to(SRC)}:{line}: {text!r}" for line, text in spelled_names(ast.parse(f.read_text()))]
    assert not where, "run-directory names spelled outside rundir.py (use RunDir's constants):\n" + "\n".join(where)


# ------------------------------------------------------------------------------------------------ child runs


def test_child_runs_keep_their_folder_names_and_take_a_seed(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.variant(0.51) == tmp_path / "ablate" / "w0.51"
    assert rd.variant(0.0) == tmp_path / "ablate" / "w0"
    assert rd.variant(0.0) / RunDir.VARIANT_EVAL == tmp_path / RunDir.BASELINE_EVAL
    assert rd.scaling_point(3e12, 1234) == tmp_path / "scaling" / "C3e12" / "N1234"
    assert rd.scaling_point(1.5e13, 99) == tmp_path / "scaling" / "C1.5e13" / "N99"
    assert rd.arm("continued-vocab8") == tmp_path / "decide" / "continued-vocab8"
    assert rd.finetuning("sft") == tmp_path / "finetune" / "sft"
    assert tmp_path / RunDir.DOWNSTREAM == rd.finetuning("classify")
    # another training seed: a folder of its own beside the seedless one (the last name carries it)
    assert rd.variant(0.51, seed=2) == tmp_path / "ablate" / "w0.51-seed2"
    assert rd.scaling_point(3e12, 1234, seed=0) == tmp_path / "scaling" / "C3e12" / "N1234-seed0"
    assert rd.arm("scratch", seed=1) == tmp_path / "decide" / "scratch-seed1"
    assert rd.mix_variant(3e4, 0.5, 1) == tmp_path / "mix" / "D3e04-w0.5-s1"
    with pytest.raises(ValueError, match="child run kind"):
        rd.child("nope", "x")
    with pytest.raises(ValueError, match="needs a name"):
        rd.child(RunDir.DECIDE_DIR)


# ------------------------------------------------------------------------------------------------ the resolver


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_resolver_run_directory_model_folder_or_neither(tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ref = resolve_model_ref(model)
    assert (ref.model_dir, ref.run_dir, ref.is_run, ref.trained) == (model, None, False, True)
    assert ref.finetune_out("sft") == tmp_path / "hf-ft-sft"
    assert ref.finetune_out("compare", standalone=Path("finetune-compare")) == Path("finetune-compare")

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    with pytest.raises(UserError) as e:  # a run directory before `domainlm train`
        resolve_model_ref(run)
    assert _one_line(e) == (f"{run}: a run directory without a trained model (model/config.json); run `domainlm "
                            "train` on it first")
    ref = resolve_model_ref(run, need_model=False)
    assert (ref.run_dir, ref.model_dir, ref.trained) == (run, run / "model", False)
    shutil.copytree(model, run / "model")
    ref = resolve_model_ref(run)
    assert (ref.model_dir, ref.run_dir, ref.is_run, ref.trained) == (run / "model", run, True, True)
    assert ref.finetune_out("sft") == run / "finetune" / "sft"

    markers = tmp_path / "markers"  # a run directory known by its stage markers alone, or by a stage output
    (markers / ".stages").mkdir(parents=True)
    assert resolve_model_ref(markers, need_model=False).is_run
    only_plan = tmp_path / "planned"
    only_plan.mkdir()
    (only_plan / "plan.json").write_text("{}")
    assert resolve_model_ref(only_plan, need_model=False, outputs=[RunDir.PLAN]).is_run

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        resolve_model_ref(tmp_path / "empty")
    assert _one_line(e) == (f"{tmp_path / 'empty'}: neither a Hugging Face model folder (no config.json) nor a "
                            "domainlm run directory (no config.yaml)")
    with pytest.raises(UserError) as e:
        resolve_model_ref(only_plan, need_model=False)  # without the outputs it is told to count
    assert "neither" in _one_line(e)
    with pytest.raises(UserError) as e:
        resolve_model_ref(tmp_path / "missing", key="--base")
    assert _one_line(e) == f"--base: {tmp_path / 'missing'}: no such model folder or run directory"
    with pytest.raises(UserError) as e:
        resolve_model_ref(model / "config.json", key="train.init_from")
    assert _one_line(e).startswith(f"train.init_from: {model / 'config.json'}: a file; expected a Hugging Face")


def test_commands_answer_alike(tmp_path, cli):
    """eval, finetune and continued pretraining's base say the same line for the same folder."""
    from domainlm.model.base import model_folder

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    why = f"{run}: a run directory without a trained model (model/config.json)"
    for args in (("eval", str(run)), ("finetune", str(run), "--data", str(tmp_path / "sft.jsonl"))):
        code, _, err = cli(*args)
        assert code == 2 and err.startswith(f"error: {why}") and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UserError, match=f"^train.init_from: {re.escape(why)}"):
        model_folder(run)
    assert not (run / "finetune").exists() and not (run / "eval").exists()  # nothing written


# ------------------------------------------------------------------------------------------------ typed outputs


def test_schema_for_every_run_directory_json_file():
    cases = {
        RunDir.PLAN: outputs.Plan, RunDir.EVAL: outputs.AnyEval, RunDir.TASKS: outputs.TaskResults,
        "ablate/w0.51/eval.json": outputs.AnyEval, "decide/continued/eval.json": outputs.AnyEval,
        "decide/continued/logs/train.json": outputs.TrainSummary, "scaling/C3e12/N99/logs/train.json":
            outputs.TrainSummary, RunDir.POINTS: outputs.ScalingPoint, "finetune/sft/finetune.json":
            outputs.AnyFinetune, "finetune/classify/compare.json": outputs.AnyComparison,
        RunDir.EXTENDED_AUDIT: outputs.ExtensionAudit, RunDir.EXTENSION: outputs.Extension,
        "decide/continued-vocab8/base/audit.json": outputs.ExtensionAudit,
        "decide/continued-vocab8/base/extension.json": outputs.Extension, RunDir.AUDIT: outputs.Audit,
        "tokens-0123456789ab/counts.json": outputs.Counts, f"{RunDir.TASK_DATA}/balance.json": outputs.TaskData,
        RunDir.FINETUNE_COMPARE: outputs.FinetuneComparison, RunDir.CLASSIFY_COMPARE: outputs.ClassifyComparison,
    }
    assert {rel: pipeline.schema_for(rel) for rel in cases} == cases
    assert pipeline.schema_for("notes/todo.json") is None


def test_the_output_check_fails_on_a_file_without_a_model_or_off_its_model(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / ".stages").mkdir()
    (run / ".stages" / "eval.json").write_text("{}")  # bookkeeping: not an output
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")  # the Hugging Face format: not ours
    assert check_outputs(run) == {}
    (run / RunDir.TASKS).write_text(json.dumps({"licensedb-category": {"task": "x"}}))
    with pytest.raises(AssertionError, match="not a valid TaskResults"):
        check_outputs(run)
    (run / RunDir.TASKS).unlink()
    (run / "eval" / "notes.json").write_text("{}")
    with pytest.raises(AssertionError, match="eval/notes.json: a JSON output without a model"):
        check_outputs(run)
