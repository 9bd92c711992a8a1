"""Hostile inputs (issue 23): each case of a table of bad, odd or hostile inputs ends in the expected exit code
and one line on stderr (no traceback, no "internal error"), writes nothing outside the run and loses nothing
already written. Plus: no command injection through `launch slurm`'s script, no write through a symbolic link
planted in a run directory, SIGINT/SIGTERM end with one line and 130/143."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure

from domainlm import faults, stages
from domainlm.data import sources
from domainlm.data.tokens import TokenWriter
from domainlm.launch import slurm
from domainlm.rundir import atomic_write, open_append, publish, temp_path, write_json
from domainlm.train.checkpoint import remove_partial
from test_train_fixtures import LEGAL, NEWS, make_run, make_tiny_model, one_thread  # noqa: F401 (autouse)

VICTIM = "precious: outside the run\n"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny run (tokenizer/, tokens/, config) and a tiny HF model folder, made once; cases copy them."""
    tmp = tmp_path_factory.mktemp("hostile")
    return {"run_cfg": make_run(tmp / "r"), "model": make_tiny_model(tmp / "model", (LEGAL + NEWS) * 10)}


def copy_run(base, tmp: Path) -> Path:
    """The tiny run copied under ``tmp``; returns its config (run_dir points at the copy)."""
    src = base["run_cfg"]
    data = yaml.safe_load(src.read_text())
    shutil.copytree(data["run_dir"], tmp / "run")
    data["run_dir"] = str(tmp / "run")
    out = tmp / "tiny.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def variant(base, tmp: Path, **changes) -> Path:
    """The tiny run's config with ``changes`` (dotted keys; the value None deletes the key), not its files."""
    data = yaml.safe_load(base["run_cfg"].read_text())
    data["run_dir"] = str(tmp / "run")
    for key, value in changes.items():
        *path, last = key.split(".")
        d = data
        for p in path:
            d = d.setdefault(p, {})
        if value is None:
            d.pop(last, None)
        else:
            d[last] = value
    out = tmp / "bad.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def scaling_csv(path: Path, loss, scale: float = 1.0) -> Path:
    """15 points on 3 IsoFLOP budgets (N ×¼…×4 around 20 tokens/param), loss = loss(N, D)."""
    rows = ["params,tokens,loss"]
    for c in (1e15, 1e16, 1e17):
        for k in (0.25, 0.5, 1, 2, 4):
            n = math.sqrt(c / 120) * k
            d = c / (6 * n)
            rows.append(f"{n * scale:.6g},{d * scale:.6g},{loss(n, d):.9g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def chinchilla(n: float, d: float) -> float:
    return 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28  # Hoffmann et al. 2022, eq. 10


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != stages.LOCK}


# ------------------------------------------------------------------------------------------ the table


def _cfg(**changes):
    return lambda base, tmp: ["plan", str(variant(base, tmp, **changes))]


def _big_config(base, tmp):
    path = variant(base, tmp)
    path.write_text(path.read_text() + "".join(f"# padding line {i}\n" for i in range(70_000)))  # > 1 MiB
    return ["plan", str(path)]


def _duplicate_key(base, tmp):
    path = tmp / "dup.yaml"
    path.write_text(base["run_cfg"].read_text() + "name: again\n")
    return ["plan", str(path)]


def _config_name_newline(base, tmp):
    path = tmp / "x\ntouch pwned #.yaml"
    shutil.copy(copy_run(base, tmp), path)
    return ["launch", "slurm", str(path), "--gpus-per-node", "0", "--dry-run"]


def _points(loss, scale=1.0, name="p.csv"):
    return lambda base, tmp: ["scaling", "--points", str(scaling_csv(tmp / name, loss, scale))]


def _counts(base, tmp):
    cfg = copy_run(base, tmp)
    counts = tmp / "run" / "tokens" / "counts.json"
    counts.write_text(json.dumps(json.loads(counts.read_text()) | {"vocab_size": -5}))
    return ["train", str(cfg)]


def _state(base, tmp):
    """A checkpoint whose state.json is damaged but listed with its checksum in the manifest."""
    cfg = copy_run(base, tmp)
    ck = tmp / "run" / "checkpoints" / "step-00000010"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text('{"step": "x"}')
    (ck / "manifest.json").write_text(json.dumps({"state.json": hashlib.sha256(b'{"step": "x"}').hexdigest()}))
    return ["train", str(cfg)]


def _one_class(base, tmp):
    data = tmp / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "mit"}) + "\n" for t in LEGAL))
    return ["finetune", str(base["model"]), "--data", str(data), "--head", "classification", "--out",
            str(tmp / "ft")]


def _long_line(base, tmp):
    data = tmp / "sft.jsonl"
    with open(data, "w") as f:
        f.write(json.dumps({"prompt": "a", "response": "b"}) + "\n")
        f.write(json.dumps({"prompt": "x" * (5 * 2**20), "response": "b"}) + "\n")  # 5 MB: over the 4 MiB bound
    return ["finetune", str(base["model"]), "--data", str(data), "--steps", "1", "--out", str(tmp / "ft")]


def _mismatched_weights(base, tmp):
    model = tmp / "model"
    shutil.copytree(base["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3}))  # 3 layers, weights of 2
    return ["generate", str(model), "--prompt", "hi"]


def _markup_run(base, tmp):
    run = tmp / "odd[/bold]dir"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: r\n")
    return ["report", str(run)]


CASES = [
    # config fields: finite, bounded, no control characters, no duplicate keys, bounded size
    ("max_tokens-inf", _cfg(**{"train.max_tokens": math.inf}), 2, ["train.max_tokens", "finite"]),
    ("lr-nan", _cfg(**{"train.lr": math.nan}), 2, ["train.lr", "finite"]),
    ("micro_batch-1e30", _cfg(**{"train.micro_batch": 10**30, "train.tokens_per_step": None}), 2,
     ["train.micro_batch", "less than or equal"]),
    ("warmup-1e30", _cfg(**{"train.warmup_steps": 10**30}), 2, ["train.warmup_steps", "at most"]),
    ("flops-nan", _cfg(**{"budget.flops": math.nan}), 2, ["budget.flops", "finite"]),
    ("run_dir-newline", _cfg(run_dir="run\ntouch pwned #"), 2, ["run_dir", "control character"]),
    ("sbatch_args-newline", _cfg(**{"prepare.slurm.sbatch_args": {"x": "1\nrm -rf /"}}), 2,
     ["prepare.slurm.sbatch_args", "control character"]),
    ("duplicate-key", _duplicate_key, 2, ["dup.yaml", "duplicate key 'name'"]),
    ("config-over-1MiB", _big_config, 2, ["bad.yaml", "at most 1,048,576 bytes"]),
    ("config-name-newline", _config_name_newline, 2, ["the config path", "control character"]),
    # CLI flags
    ("memory-d_model-7", lambda b, t: ["memory", "--params", "7B", "--d-model", "7", "--n-layers", "3"], 2,
     ["--d-model", "≥ 8"]),
    ("memory-d_model-8", lambda b, t: ["memory", "--params", "7B", "--d-model", "8", "--n-layers", "3"], 0, []),
    ("memory-params-1e300", lambda b, t: ["memory", "--params", "1e300"], 2, ["--params", "at most"]),
    ("memory-model-and-params", lambda b, t: ["memory", "--model", str(b["model"]), "--params", "7B"], 2,
     ["--params", "has its own"]),
    ("decide-lr-negative", lambda b, t: ["decide", str(b["run_cfg"]), "--lr", "-1"], 2, ["--lr", "> 0"]),
    ("decide-lr-nan", lambda b, t: ["decide", str(b["run_cfg"]), "--lr", "nan"], 2, ["--lr", "got nan"]),
    ("decide-base-tokens-negative", lambda b, t: ["decide", str(b["run_cfg"]), "--base-tokens", "-5"], 2,
     ["--base-tokens", "> 0"]),
    ("generate-temperature-nan", lambda b, t: ["generate", str(b["model"]), "--temperature", "nan"], 2,
     ["--temperature", "finite"]),
    ("finetune-lr-zero", lambda b, t: ["finetune", str(b["model"]), "--data", "x.jsonl", "--lr", "0"], 2,
     ["--lr", "> 0"]),
    # degenerate scaling fits
    ("points-equal-losses", _points(lambda n, d: 3.0), 2, ["every point has the loss 3"]),
    ("points-1e156", _points(chinchilla, scale=1e150), 2, ["column 'params'", "outside"]),
    ("points-tiny-losses", _points(lambda n, d: chinchilla(n, d) * 1e-300), 2, ["column 'loss'", "outside"]),
    # markup and emoji never interpreted in user strings
    ("markup-in-a-run-path", _markup_run, 0, []),
    ("emoji-in-a-path", lambda b, t: ["report", str(t / "H:M:S:thumbs_up:")], 2, [":thumbs_up:", "H:M:S"]),
    # damaged stage outputs: one line naming the file
    ("counts-vocab-negative", _counts, 2, ["counts.json", "vocab_size"]),
    ("checkpoint-state-damaged", _state, 2, ["state.json", "corrupted checkpoint", "step"]),
    # silently wrong before
    ("classification-one-class", _one_class, 2, ["cls.jsonl", "two classes"]),
    # bounded reads; third-party noise off stderr
    ("jsonl-line-over-4MiB", _long_line, 2, ["sft.jsonl:2", "more than 4,194,304 bytes"]),
    ("weights-not-matching-config", _mismatched_weights, 2, ["config.json", "missing"]),
]


@pytest.mark.parametrize(("name", "make", "code", "needles"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input(base, tmp_path, cli, name, make, code, needles):
    case = tmp_path / "case"
    case.mkdir()
    argv = make(base, case)
    before = snapshot(tmp_path)
    rc, out, err = cli(*argv)
    assert rc == code, (rc, out[-800:], err[-2000:])
    assert "Traceback" not in out + err and "internal error" not in out + err
    if code == 0:
        assert not err.strip(), err[-2000:]
        if name == "markup-in-a-run-path":  # the path as it is, in the hints and in what was written
            assert f"wrote{case / 'odd[/bold]dir' / 'report' / 'index.html'}" in "".join(out.split()), out
            assert "domainlm eval odd[/bold]dir" in out or f"eval {case}/odd[/bold]dir" in out, out
        return
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert snapshot(tmp_path) == before  # nothing written, nothing lost
    assert not any(p.name == "pwned" for p in tmp_path.rglob("*"))


def test_network_endpoint_that_never_answers_is_one_line(tmp_path, monkeypatch, cli):
    """An hf: source whose endpoint accepts TCP and never answers: one line after the probe's read timeout
    (it took 402 s of retries), and the run goes offline (its workers too)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in range(8)], daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "HUB_TIMEOUT_S", 0.5)
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(yaml.safe_dump({"name": "h", "run_dir": str(tmp_path / "run"), "sources": [
        {"name": "a", "role": "domain", "weight": 1, "input": "hf:someone/nowhere"}]}))
    try:
        rc, out, err = cli("prepare", str(cfg))
    finally:
        srv.close()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err[-2000:]
    assert "cannot reach the Hugging Face Hub" in lines[0] and "no answer within 0.5 s" in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize(("sig", "code"), [("INT", 130), ("TERM", 143)])
def test_sigint_sigterm_one_line_then_rerun_finishes(tmp_path, monkeypatch, cli, sig, code):
    """The signal arrives mid-report (after its figures, before its page): one line naming the command and how
    to resume, the shell's 128+N exit code, the lock released; the same command then finishes."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    monkeypatch.setenv("DOMAINLM_FAULT_DIR", str(tmp_path))
    monkeypatch.setitem(faults._ARMED, "report.mid_write", (1, getattr(signal, f"SIG{sig}")))
    rc, out, err = cli("report", str(run))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code and len(lines) == 1, (rc, err[-2000:])
    assert lines[0] == (f"interrupted (SIG{sig}): `domainlm report` stopped; finished work is kept: rerun the same "
                        "command to resume")
    assert not (run / "report" / "index.html").exists()
    monkeypatch.delitem(faults._ARMED, "report.mid_write")
    rc, out, err = cli("report", str(run))
    assert rc == 0 and (run / "report" / "index.html").is_file(), err[-2000:]


# ------------------------------------------------------------------------------------------ launch slurm

HOSTILE = ["a b", "$(touch pwned)", "`touch pwned`", "it's", 'say "hi"', "x;touch pwned", "100%", "back\\slash",
           "#hash", "&&touch pwned", "$HOME"]


def fake_cluster(bin_dir: Path, log: Path) -> None:
    """``sbatch`` that runs the script with bash (as the job would, in --chdir), after checking it with ``bash -n``
    and recording the #SBATCH directives as sbatch's own parser reads them; ``srun`` and ``scontrol`` that record
    their arguments, NUL-separated."""
    bin_dir.mkdir()
    parse = (f"import shlex,sys\n"
             f"for line in open(sys.argv[1]):\n"
             f"    if line.startswith('#SBATCH '):\n"
             f"        print(*shlex.split(line[8:], posix=True), sep='\\0', end='\\0',\n"
             f"              file=open({str(log)!r} + '.sbatch', 'a'))\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/bash\n"
        "script=\"${@: -1}\"\n"
        "bash -n \"$script\" || exit 3\n"
        f"{shlex.quote(sys.executable)} -c {shlex.quote(parse)} \"$script\"\n"
        "SLURM_JOB_ID=7 SLURM_JOB_NUM_NODES=1 SLURM_JOB_NODELIST=node1 SLURM_CPUS_PER_TASK=1 bash \"$script\" "
        f">{shlex.quote(str(log))}.job 2>&1 || exit 4\n"
        "echo 7\n")
    for name in ("srun", "scontrol"):
        (bin_dir / name).write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" >> {shlex.quote(str(log))}.{name}\n"
                                    "[ \"$1\" = show ] && echo node1\nexit 0\n")
    for p in bin_dir.iterdir():
        p.chmod(p.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_launch_slurm_quotes_every_path(base, tmp_path, monkeypatch, cli, hostile):
    """A run directory and config file named with shell syntax: the generated script passes `bash -n`; run (by
    a fake sbatch, under a fake srun) it executes nothing of the name, hands `domainlm train` the exact config
    path and writes its log where the run is; sbatch's own parser reads --chdir/--output back unchanged."""
    work = tmp_path / f"w {hostile}"
    work.mkdir()
    cfg = copy_run(base, work)
    data = yaml.safe_load(cfg.read_text())
    (work / "run").rename(work / f"run {hostile}")
    data["run_dir"] = str(work / f"run {hostile}")
    named = work / f"cfg {hostile}.yaml"
    named.write_text(yaml.safe_dump(data))
    fake_cluster(tmp_path / "bin", tmp_path / "log")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(work)
    rc, out, err = cli("launch", "slurm", str(named), "--gpus-per-node", "0", "--json")
    assert rc == 0, err[-2000:]
    assert json.loads(out)["job_id"] == "7"
    srun = (tmp_path / "log.srun").read_text().split("\0")[:-1]
    assert srun[-3:] == ["domainlm", "train", str(named.resolve())], srun
    directives = dict(a.split("=", 1) for a in (tmp_path / "log.sbatch").read_text().split("\0") if "=" in a)
    assert directives["--chdir"] == str(work)
    assert directives["--output"].replace("%%", "%") == str(work / f"run {hostile}" / "launch" / "slurm-%j.out")
    assert not list(tmp_path.rglob("pwned")), (tmp_path / "log.job").read_text()


def test_sbatch_quote_reads_back_as_sbatch_parses_it():
    """`sbatch_quote` against a transcription of sbatch's _get_argument (src/sbatch/opt.c): quotes group,
    a backslash takes the next character literally."""
    def get_argument(line: str) -> str:
        out, i, quoted, q = [], 0, False, ""
        while i < len(line) and (quoted or not line[i].isspace()):
            c = line[i]
            if c == "\\":
                out.append(line[i + 1])
                i += 2
                continue
            if quoted and c == q:
                quoted = False
            elif not quoted and c in "\"'":
                quoted, q = True, c
            else:
                out.append(c)
            i += 1
        return "".join(out)

    for value in [*HOSTILE, "plain/path", "tab\tinside"[:3]]:
        assert get_argument(f"--chdir={slurm.sbatch_quote(value)}") == f"--chdir={value}", value
    with pytest.raises(slurm.UserError, match="control character"):
        slurm.no_control("a\nb", "run_dir")


# ------------------------------------------------------------------------------------------ planted links


def plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def test_writes_never_follow_a_planted_link(tmp_path, cli):
    """Links planted at every temp and marker name a run's writers use point at a file outside the run: the
    writes replace or remove the links, the target is untouched; a link at the lock or an appended log is
    refused in one line."""
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    # atomic_write / write_json: the fixed temp name, and a link at the final name (the rename replaces it)
    for rel in ("eval/.eval.json.tmp", "report/.index.html.tmp", ".stages/.train.json.tmp", "plan.json"):
        plant(run / rel, victim)
    write_json(run / "eval" / "eval.json", {"ok": 1})
    train = stages.Stage(run, "train", run / "eval" / "eval.json", ("fp",))
    train.finish()
    atomic_write(run / "plan.json", "{}")
    assert train.done() and not (run / "plan.json").is_symlink()
    # a marker that is a link: written by a rename over it
    plant(run / ".stages" / "tokenize.json", victim)
    tokenize = stages.Stage(run, "tokenize", run / "eval" / "eval.json", ("fp",))
    tokenize.finish()
    assert tokenize.done() and not (run / ".stages" / "tokenize.json").is_symlink()
    # temp files of writers that need a name (savefig, TokenWriter): what was there is removed first
    plant(run / "report" / ".loss.tmp.png", victim)
    tmp = temp_path(run / "report" / "loss.png")
    assert not os.path.lexists(tmp)
    tmp.write_bytes(b"png")
    publish(tmp, run / "report" / "loss.png")
    plant(run / "tokens" / "a" / "train.bin.tmp", victim)
    with TokenWriter(run / "tokens" / "a" / "train.bin", "uint16") as w:
        w.write([1, 2, 3])
    # a link planted at a folder's temp name (checkpoints, exports): removed, never written into
    outside = tmp_path / "outside"
    outside.mkdir()
    plant(run / "checkpoints" / ".tmp-step-00000010", outside)
    remove_partial(run)
    assert not os.path.lexists(run / "checkpoints" / ".tmp-step-00000010") and outside.is_dir()
    # appended files (metrics.jsonl, logs) and the lock: refused
    plant(run / "logs" / "metrics.jsonl", victim)
    with pytest.raises(stages.UserError, match="symbolic link"):
        open_append(run / "logs" / "metrics.jsonl")
    plant(run / stages.LOCK, victim)
    rc, out, err = cli("report", str(run))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and ".lock: a symbolic link" in lines[0], err
    (run / stages.LOCK).unlink()
    plant(run / "report" / ".index.html.tmp", victim)
    rc, out, err = cli("report", str(run))  # the report's own temp files
    assert rc == 0, err
    assert victim.read_text() == VICTIM and list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "run", "victim.txt"]


def test_sbatch_script_check_uses_bash(tmp_path):
    """The script of a plain run passes `bash -n` (the syntax check the fake cluster relies on is real)."""
    text = slurm.train_script(config=tmp_path / "c.yaml", workdir=tmp_path, run_dir=tmp_path / "run",
                              job_name="domainlm-train-x", nodes=2, gpus_per_node=0, procs_per_node=1,
                              cpus_per_task=1, partition=None, time_limit=None, python=sys.executable)
    path = tmp_path / "t.sbatch"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    path.write_text(text + "if\n")
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode != 0


@pytest.mark.parametrize("target", ["plot", "json"])
def test_disk_full_names_the_file(tmp_path, monkeypatch, cli, target):
    """A write that fails with ENOSPC on an open file (no file name in the OSError) is one line naming the
    file: the chart of `plan --plot` (matplotlib's savefig), and any atomic_write (eval --out, law.json, …)."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if target == "plot":
        monkeypatch.setattr(Figure, "savefig", full)
        rc, out, err = cli("plan", "--flops", "1e20", "--plot", str(tmp_path / "chart.png"))
        shown = tmp_path / "chart.png"
    else:
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError) as e:
            atomic_write(tmp_path / "law.json", "{}")
        assert e.value.filename == str(tmp_path / "law.json") and e.value.errno == errno.ENOSPC
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # the temp file is gone too
        return
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and f"disk full writing {shown}" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
