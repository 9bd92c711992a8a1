"""Bad and odd inputs across the commands (issue 12): each ends in one ``error:`` line that names the file, key
or flag and what to do, exit code 2, no traceback — and loses nothing (a rerun after the fix completes)."""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from crashkit import KILLED, domainlm, python
from domainlm import stages
from domainlm.data import pipeline, sources, tokens
from domainlm.data.command import run_prepare
from domainlm.tokenize import run_tokenize
from test_prepare import quiet_console, train_tokenizer, two_sources, write_config, write_texts
from test_train_fixtures import (  # noqa: F401 (one_thread: autouse fixture)
    LEGAL,
    NEWS,
    clone_run,
    make_run,
    make_tiny_model,
    one_thread,
    read_metrics,
    run_dir,
    single_thread,
    train_in_process,
)

STEPS = 10  # the trained fixture: one checkpoint and one eval, at step 10


def one_line(result, *needles: str) -> str:
    """The single ``error:`` line of a failed command (exit 2, nothing else on stderr, no traceback)."""
    code, out, err = result
    assert code == 2, (code, out[-500:], err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in out + err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained for STEPS steps (checkpoint, eval, HF export); tests clone it before changing it."""
    with single_thread():
        cfg = make_run(tmp_path_factory.mktemp("trained"))
        train_in_process(cfg, max_steps=STEPS)
    return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run through `domainlm prepare` and `tokenize`: data/ and tokens/ as the real stages write them."""
    tmp = tmp_path_factory.mktemp("prepared")
    cfg = two_sources(tmp, 45)
    run = tmp / "run"
    run_prepare(cfg, quiet_console())
    train_tokenizer(run, list(pipeline.iter_documents(run, "a", "train")))
    run_tokenize(cfg, quiet_console())
    return cfg


def copy_prepared(cfg: Path, dst: Path) -> Path:
    data = yaml.safe_load(cfg.read_text())
    shutil.copytree(data["run_dir"], dst / "run")
    data["run_dir"] = str(dst / "run")
    out = dst / "cfg.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"), (LEGAL + NEWS) * 10)


def read_only(monkeypatch, root: Path) -> None:
    """Writes under ``root`` fail as on a read-only mount (EROFS) — also for root, whom file modes don't stop.
    Patched where Python opens and creates files: open (builtin and io), os.open, os.mkdir."""
    import builtins
    import io

    root = os.path.abspath(root)

    def under(path) -> bool:
        return not isinstance(path, int) and os.path.abspath(os.fspath(path)).startswith(root)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def ro_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def ro_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def ro_mkdir(path, *a, **k):
        if under(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            refuse(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(io, "open", ro_open)
    monkeypatch.setattr(os, "open", ro_os_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------------------------------ silent or wrong data


def test_truncated_token_file_is_refused_and_tokenize_rewrites_it(prepared, tmp_path, cli):
    cfg = copy_prepared(prepared, tmp_path)
    run = run_dir(cfg)
    path = tokens.token_path(run, "a", "train")
    good = path.read_bytes()
    for size in (1000, 1001):  # even: trained on fewer tokens without a word; odd: "rerun tokenize" did nothing
        path.write_bytes(good[:size])
        with pytest.raises(tokens.UserError, match=r"train.bin: .*rerun `domainlm tokenize CONFIG`"):
            tokens.open_tokens(run, "a", "train")
        code, _, err = cli("tokenize", str(cfg))
        assert code == 0, err
        assert path.read_bytes() == good  # the tokenize stage saw its output was not what its marker says
    assert tokens.open_tokens(run, "a", "train").shape == (len(good) // 2,)


def test_tokenize_with_another_tokenizer_that_is_not_one(prepared, tmp_path, cli):
    one_line(cli("tokenize", str(prepared), "--tokenizer", str(tmp_path)), str(tmp_path / "tokenizer.json"),
             "expected a Hugging Face tokenizer folder")
    (tmp_path / "tokenizer.json").write_text("{not json")
    one_line(cli("tokenize", str(prepared), "--tokenizer", str(tmp_path)), "cannot load tokenizer")
    assert not list(run_dir(prepared).glob("tokens-*"))


def test_train_refuses_truncated_or_random_token_files(trained, tmp_path, cli):
    cfg = clone_run(trained, tmp_path)
    path = tokens.token_path(run_dir(cfg), "legal", "train")
    good = path.read_bytes()
    path.write_bytes(good[:1000])
    one_line(cli("train", str(cfg), "--max-steps", "12"), str(path), "counts.json says", "domainlm tokenize")
    rng = np.random.default_rng(0)
    path.write_bytes(rng.integers(0, 2**16, size=len(good) // 2, dtype=np.uint16).tobytes())  # the right size
    one_line(cli("train", str(cfg), "--max-steps", "12"), str(path), "outside the vocabulary", "domainlm tokenize")
    assert [r["step"] for r in read_metrics(run_dir(cfg))][-1] == STEPS  # nothing trained on it


def test_truncated_jsonl_gz_source(tmp_path, cli):
    docs = write_texts(tmp_path / "docs", 45, seed=4)
    raw = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    src = tmp_path / "a.jsonl.gz"
    src.write_bytes(raw[: len(raw) // 2])
    write_texts(tmp_path / "b", 45, seed=2)
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 0.5, "input": str(src)},
                                  {"name": "b", "role": "general", "weight": 0.5, "input": str(tmp_path / "b")}])
    one_line(cli("prepare", str(cfg)), str(src), "truncated or corrupt compressed file")
    src.write_bytes(raw)  # fixed: the rerun completes
    code, _, err = cli("prepare", str(cfg))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "data" / "stats.json").read_text())["sources"]["a"]["docs_in"] == 45


def test_truncated_jsonl_zst_source_is_an_error_not_an_empty_file(tmp_path):
    import zstandard

    rng = np.random.default_rng(1)
    lines = b"".join(json.dumps({"text": " ".join(map(str, rng.integers(0, 1000, 80)))}).encode() + b"\n"
                     for _ in range(400))
    c = zstandard.ZstdCompressor()
    whole = c.compress(lines[: len(lines) // 3]) + c.compress(lines[len(lines) // 3 :])  # two frames
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(whole)
    with sources._open_binary(str(path)) as f:
        assert b"".join(sources._lines(f, str(path))) == lines
    path.write_bytes(whole[: len(whole) - 100])  # zstandard's stream_reader read this as a shorter, valid file
    with pytest.raises(sources.UserError, match="a.jsonl.zst: truncated or corrupt compressed file"):
        with sources._open_binary(str(path)) as f:
            for _ in sources._lines(f, str(path)):
                pass


def test_input_path_with_glob_characters_is_read_as_a_path(tmp_path):
    write_texts(tmp_path / "my[test]corpus", 45)
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1,
                                   "input": str(tmp_path / "my[test]corpus")}])
    result = run_prepare(cfg, quiet_console())
    assert result["stats"]["sources"]["a"]["docs_in"] == 45


def test_ablate_checks_the_val_documents_before_training(trained, tmp_path, cli):
    cfg = clone_run(trained, tmp_path)  # token files, no data/ (never `domainlm prepare`d)
    one_line(cli("ablate", str(cfg), "--domain-weights", "0,1"), "stats.json", "no prepared data")
    assert not (run_dir(cfg) / "ablate").exists()


def test_report_on_a_folder_that_is_not_a_run(tmp_path, cli):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("buy milk")
    one_line(cli("report", str(folder)), str(folder), "not a run directory")
    assert sorted(p.name for p in folder.iterdir()) == ["todo.txt"]  # nothing written, not even a lock
    one_line(cli("report", str(tmp_path / "missing")), "no such run directory")
    one_line(cli("report", str(folder / "todo.txt")), "todo.txt: a file, not a run directory")


LOCKED_COMMANDS = [
    ("train", lambda cfg, run: ["train", str(cfg)]),
    ("prepare", lambda cfg, run: ["prepare", str(cfg)]),
    ("tokenizer", lambda cfg, run: ["tokenizer", str(cfg)]),
    ("tokenize", lambda cfg, run: ["tokenize", str(cfg)]),
    ("plan", lambda cfg, run: ["plan", str(cfg)]),
    ("eval", lambda cfg, run: ["eval", str(run)]),
    ("report", lambda cfg, run: ["report", str(run)]),
    ("finetune", lambda cfg, run: ["finetune", str(run), "--data", str(run / "sft.jsonl")]),
    ("ablate", lambda cfg, run: ["ablate", str(cfg)]),
    ("mix", lambda cfg, run: ["mix", str(cfg)]),
    ("scaling", lambda cfg, run: ["scaling", str(cfg)]),
]


@pytest.fixture
def locked_run(trained, tmp_path):
    """A trained run whose lock another process holds, as a running `domainlm train` does."""
    cfg = clone_run(trained, tmp_path)
    run = run_dir(cfg)
    shutil.copy(cfg, run / "config.yaml")  # what plan/prepare write into a run
    (run / "sft.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    code = "import sys\nfrom domainlm import stages\nwith stages.locked(sys.argv[1], 'train'):\n" \
           "    print('locked', flush=True)\n    sys.stdin.read()\n"
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield cfg, run, holder
    holder.stdin.close()
    holder.wait(timeout=60)


@pytest.mark.parametrize(("name", "args"), LOCKED_COMMANDS, ids=[c[0] for c in LOCKED_COMMANDS])
def test_every_writing_command_takes_the_run_lock(locked_run, cli, name, args):
    cfg, run, holder = locked_run
    before = snapshot(run)
    one_line(cli(*args(cfg, run)), str(run), f"another `domainlm train` (pid {holder.pid}) is running")
    assert snapshot(run) == before


def test_second_train_is_refused_then_runs_once_the_first_is_done(locked_run, cli):
    cfg, run, holder = locked_run
    one_line(cli("train", str(cfg), "--max-steps", "12"), "another `domainlm train`")
    holder.stdin.close()
    holder.wait(timeout=60)
    code, _, err = cli("train", str(cfg), "--max-steps", "12")
    assert code == 0, err
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))  # no step logged twice


def test_lock_without_flock_support_and_disk_errors_inside_it(tmp_path, monkeypatch):
    import fcntl

    def no_flock(*a):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)  # e.g. an NFS mount without locks: run, unlocked
    ran = []
    with stages.locked(tmp_path / "run", "train"):
        ran.append(1)
    assert ran == [1]
    monkeypatch.undo()
    with pytest.raises(stages.UserError, match=r"run: `domainlm prepare` stopped: disk full writing /x/y.bin; free"):
        with stages.locked(tmp_path / "run", "prepare"):
            raise RuntimeError("datatrove task failed") from OSError(errno.ENOSPC, "No space left", "/x/y.bin")


# ------------------------------------------------------------------------------------------ environment


READ_ONLY_COMMANDS = [
    ("prepare", lambda cfg, run: ["prepare", str(cfg)]),
    ("train", lambda cfg, run: ["train", str(cfg), "--max-steps", "12"]),
    ("eval", lambda cfg, run: ["eval", str(run)]),
    ("report", lambda cfg, run: ["report", str(run)]),
    ("plan", lambda cfg, run: ["plan", str(cfg)]),
    ("tokenizer", lambda cfg, run: ["tokenizer", str(cfg)]),
]


@pytest.mark.parametrize(("name", "args"), READ_ONLY_COMMANDS, ids=[c[0] for c in READ_ONLY_COMMANDS])
def test_read_only_run_directory(trained, tmp_path, monkeypatch, cli, name, args):
    cfg = clone_run(trained, tmp_path)
    run = run_dir(cfg)
    shutil.copy(cfg, run / "config.yaml")
    (run / stages.LOCK).unlink(missing_ok=True)
    before = snapshot(run)
    read_only(monkeypatch, run)
    one_line(cli(*args(cfg, run)), str(run), "not writable", "Read-only file system")
    monkeypatch.undo()
    assert snapshot(run) == before


def test_run_dir_that_cannot_be_created(tmp_path, cli):
    write_texts(tmp_path / "a", 30)
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "a")}])
    data = yaml.safe_load(cfg.read_text())
    (tmp_path / "afile").write_text("x")
    for run_dir_value, needle in ((tmp_path / "afile", "is an existing file"),
                                  (tmp_path / "afile" / "run", "is a file, not a folder")):
        data["run_dir"] = str(run_dir_value)
        cfg.write_text(yaml.safe_dump(data))
        for command in ("prepare", "plan", "train", "tokenizer"):
            one_line(cli(command, str(cfg)), str(run_dir_value), needle)


def test_disk_full_while_tokenizing_then_rerun(prepared, tmp_path, monkeypatch, cli):
    cfg = copy_prepared(prepared, tmp_path)
    run = run_dir(cfg)
    reference = {p.name: p.read_bytes() for p in (run / "tokens" / "a").glob("*.bin")}
    shutil.rmtree(run / "tokens")
    stages.clear(run, "tokenize")

    def full(self, ids):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tokens.TokenWriter, "write", full)
    one_line(cli("tokenize", str(cfg)), str(run), "disk full", "rerun")
    monkeypatch.undo()
    code, _, err = cli("tokenize", str(cfg))
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in (run / "tokens" / "a").glob("*.bin")} == reference


def test_disk_full_in_the_data_stage_then_rerun(tmp_path, cli):
    cfg = two_sources(tmp_path, 45)
    # In a process of its own, as users run it (datatrove's log goes to a file through fd 2); its split writer
    # fails with ENOSPC, also in datatrove's forked worker processes.
    code = ("import errno, gzip, os\nreal = gzip.GzipFile.write\n"
            "def full(self, data):\n    if self.mode == gzip.WRITE:\n"
            "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n    return real(self, data)\n"
            f"gzip.GzipFile.write = full\nfrom domainlm.cli import main\nmain(['prepare', {str(cfg)!r}])\n")
    proc = python(code, cwd=tmp_path)
    one_line((proc.returncode, proc.stdout, proc.stderr), str(tmp_path / "run"), "disk full", "rerun")
    code, _, err = cli("prepare", str(cfg))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "data" / "stats.json").read_text())["sources"]["a"]["docs_out"] == 45


def test_eval_out_checked_before_the_evaluation(model_dir, tmp_path, monkeypatch, cli):
    from domainlm.evaluate import inputs

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(inputs, "load_model", never)
    (tmp_path / "doc.txt").write_text(LEGAL[0])
    text = f"x={tmp_path / 'doc.txt'}"
    one_line(cli("eval", str(model_dir), "--text", text, "--out", "/proc/nope/eval.json"), "--out",
             "/proc/nope/eval.json")
    one_line(cli("eval", str(model_dir), "--text", text, "--out", str(tmp_path)), "--out", "is a folder")


def test_plan_plot_paths(tmp_path, cli):
    one_line(cli("plan", "--flops", "1e20", "--plot", str(tmp_path / "plot.txt")), "--plot", "plot.txt", ".png")
    assert not (tmp_path / "plot.txt").exists()
    code, out, err = cli("plan", "--flops", "1e20", "--plot", str(tmp_path))  # a folder: FOLDER/plan.png
    assert code == 0, err
    assert (tmp_path / "plan.png").stat().st_size > 0 and f"wrote {tmp_path / 'plan.png'}" in " ".join(out.split())


def test_generate_on_broken_model_folders(model_dir, tmp_path, cli):
    bad = tmp_path / "truncated"
    shutil.copytree(model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line(cli("generate", str(bad), "--prompt", "The"), str(bad), "cannot load the model")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    one_line(cli("generate", str(bare), "--prompt", "The"), str(bare), "no tokenizer")


def test_torn_last_metrics_line_then_train(trained, tmp_path, cli):
    cfg = clone_run(trained, tmp_path)
    metrics = run_dir(cfg) / "logs" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "step": 11, "loss": 3.')  # a kill mid-write
    code, _, err = cli("train", str(cfg), "--max-steps", "12")
    assert code == 0, err
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13))


# ------------------------------------------------------------------------------------------ misleading


def test_user_text_is_not_rich_markup(tmp_path, model_dir, monkeypatch, cli):
    one_line(cli("prepare", str(tmp_path / "cfg" / "my[test].yaml")), "my[test].yaml", "config file not found")
    one_line(cli("prepare", "cfg/x[/y].yaml"), "cfg/x[/y].yaml")
    one_line(cli("eval", "/path/[bold]model"), "/path/[bold]model")
    one_line(cli("report", "[red]x"), "[red]x")
    code, out, err = cli("plan", "--flops", "1e20", "--plot", str(tmp_path / "p[bold]x.png"))  # what it wrote
    assert code == 0 and f"wrote{tmp_path / 'p[bold]x.png'}" in "".join(out.split()), err  # rich may wrap it
    run = tmp_path / "r[bold]un"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    code, out, err = cli("report", str(run))
    assert code == 0 and f"wrote{run / 'report' / 'index.html'}" in "".join(out.split()), err
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    monkeypatch.setitem(sys.modules, "peft", None)  # not installed
    one_line(cli("finetune", str(model_dir), "--data", str(data), "--lora", "--steps", "1",
                 "--out", str(tmp_path / "ft")), "pip install 'domainlm[lora]'")


def test_changed_model_shape_is_not_called_corruption(trained, tmp_path, cli):
    """Checkpoints that recorded their inputs: another d_model restarts and says so (tests/test_resume_inputs.py).
    Ones that did not (an earlier version wrote them): the shape check tells a changed config from corruption."""
    import hashlib

    cfg = clone_run(trained, tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["model"]["d_model"] = 64
    cfg.write_text(yaml.safe_dump(data))
    for ck in (run_dir(cfg) / "checkpoints").iterdir():  # as written before checkpoints recorded their inputs
        state = json.loads((ck / "state.json").read_text())
        del state["inputs"]
        (ck / "state.json").write_text(json.dumps(state))
        manifest = json.loads((ck / "manifest-0.json").read_text())  # rank 0's manifest lists state.json
        manifest["state.json"] = hashlib.sha256((ck / "state.json").read_bytes()).hexdigest()
        (ck / "manifest-0.json").write_text(json.dumps(manifest))
        index = json.loads((ck / "manifest.json").read_text())  # the index lists each rank's manifest
        index["manifests"]["manifest-0.json"] = hashlib.sha256((ck / "manifest-0.json").read_bytes()).hexdigest()
        (ck / "manifest.json").write_text(json.dumps(index))
    msg = one_line(cli("train", str(cfg), "--max-steps", "12"), "another model shape", "--restart")
    assert "corrupted" not in msg and "delete" not in msg and len(msg) < 400

    cfg = clone_run(trained, tmp_path / "recorded")
    cfg.write_text(yaml.safe_dump({**data, "run_dir": str(run_dir(cfg))}))
    code, _, err = cli("train", str(cfg), "--max-steps", "12")
    assert code == 0 and "changed: model.d_model, shape)" in " ".join(err.split()), err[-2000:]


def test_fitted_law_in_the_config_names_the_key(tmp_path, cli):
    write_texts(tmp_path / "a", 30)
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "a")}])
    data = yaml.safe_load(cfg.read_text())
    data["budget"] = {"flops": 1e18, "law": "fitted:/missing/law.json"}
    cfg.write_text(yaml.safe_dump(data))
    msg = one_line(cli("plan", str(cfg)), "budget.law", "/missing/law.json", "domainlm scaling")
    assert "--law" not in msg
    one_line(cli("plan", "--flops", "1e18", "--law", "fitted:/missing/law.json"), "--law fitted:/missing/law.json")


def test_kill_before_export_then_resume_logs_once_and_summarises(trained, tmp_path):
    cfg = clone_run(trained, tmp_path, fresh=True)
    proc = domainlm(["train", str(cfg), "--max-steps", str(STEPS)], fault="train.before_export:1", fault_dir=tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    run = run_dir(cfg)
    assert not (run / "model").exists()
    train_in_process(cfg, max_steps=STEPS)

    def no_nan(name):
        raise ValueError(f"{name} in logs/train.json")

    summary = json.loads((run / "logs" / "train.json").read_text(), parse_constant=no_nan)
    ref = json.loads((run_dir(trained) / "logs" / "train.json").read_text())
    assert summary["final_loss"] == ref["final_loss"] and math.isfinite(summary["final_loss"])
    assert isinstance(summary["tokens_per_s"], float) and summary["tokens_per_s"] > 0
    assert [r["step"] for r in read_metrics(run, "eval")] == [STEPS]  # the final eval is not repeated
    assert (run / "model" / "model.safetensors").exists()


def test_hf_source_while_offline_fails_fast(tmp_path, monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_hub_unreachable", lambda: "huggingface.co: Name or service not known")

    def no_network(*a, **k):
        raise AssertionError("tried the network after the hub was found unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": "hf:someone/nowhere"}])
    with pytest.raises(sources.UserError, match=r"sources\[0\].input: cannot reach the Hugging Face Hub "
                                                r"\(huggingface.co: .*\) and dataset 'someone/nowhere' is not in"):
        run_prepare(cfg, quiet_console())
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the worker processes stay offline too


# ------------------------------------------------------------------------------------------ security


def test_crafted_fsdp_checkpoint_metadata_is_refused(trained, tmp_path, cli):
    import hashlib
    import pickle

    cfg = clone_run(trained, tmp_path)
    ck = run_dir(cfg) / "checkpoints" / f"step-{STEPS:08d}"
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ck / "dcp").mkdir()
    (ck / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    manifest = json.loads((ck / "manifest-0.json").read_text())  # a crafted checkpoint has matching manifests
    manifest["dcp/.metadata"] = hashlib.sha256((ck / "dcp" / ".metadata").read_bytes()).hexdigest()
    (ck / "manifest-0.json").write_text(json.dumps(manifest))
    index = json.loads((ck / "manifest.json").read_text())
    index["manifests"]["manifest-0.json"] = hashlib.sha256((ck / "manifest-0.json").read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(index))
    one_line(cli("train", str(cfg), "--max-steps", "12"), str(ck / "dcp" / ".metadata"), "refusing posix.system")
    assert not marker.exists()


def test_single_process_group_store_is_in_a_private_folder(monkeypatch):
    import torch
    import torch.distributed as dist

    from domainlm.train import parallel

    seen = []
    monkeypatch.setattr(dist, "FileStore", lambda path, n: seen.append(path) or object())
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: None)
    parallel._init_single_process_group(parallel.Dist(0, 1, 0, torch.device("cpu")))
    folder = Path(seen[0]).parent
    assert folder.is_dir() and folder.name.startswith("domainlm-pg-") and (folder.stat().st_mode & 0o777) == 0o700
    assert not Path(seen[0]).exists()  # FileStore creates it inside the folder only we can write


# ------------------------------------------------------------------------------------------ the CLI's last resort


def test_cli_fallbacks_are_one_line(model_dir, tmp_path, monkeypatch, cli):
    import domainlm.generate as G

    def raising(exc):
        def f(*a, **k):
            raise exc
        return f

    monkeypatch.setattr(G, "generate", raising(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/out.bin")))
    one_line(cli("generate", str(model_dir)), "/x/out.bin", "disk full")  # outside any run lock, still named
    monkeypatch.setattr(G, "generate", raising(EOFError("Ran out of input")))  # click turns it into a bare Abort
    code, _, err = cli("generate", str(model_dir))
    assert code == 1 and err.strip() == "error: unexpected end of input (Ran out of input)"
    monkeypatch.setattr(G, "generate", raising(RuntimeError("boom\nsecond line")))  # a bug: one line, exit 1
    code, out, err = cli("generate", str(model_dir))
    assert code == 1 and "Traceback" not in out + err
    assert err.strip() == ("error: internal error: RuntimeError: boom; rerun with --debug for the traceback and "
                           "report it")
    import domainlm.cli

    monkeypatch.setattr(domainlm.cli, "DEBUG", False)  # --debug sets it for the process: undone after the test
    with pytest.raises(RuntimeError, match="boom"):  # --debug: the traceback
        cli("--debug", "generate", str(model_dir))


def test_scaling_refuses_a_non_causal_objective(trained, tmp_path, cli):
    """The sweep fits L(N, D) to bits per byte, which a masked or span model does not have: one line, nothing written."""
    cfg = clone_run(trained, tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data.setdefault("model", {})["objective"] = "masked"
    data["model"].pop("n_kv_heads", None)  # grouped-query attention is a decoder option
    cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
    run = run_dir(cfg)
    before = snapshot(run)
    one_line(cli("scaling", str(cfg)), "model.objective: masked", "causal")
    after = snapshot(run)
    after.pop(".lock", None)  # the run's lock, taken before the check
    assert after == before
