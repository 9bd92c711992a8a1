"""Slurm for real: a one-node cluster (munged, slurmctld, slurmd as root; tests/slurm_cluster.py) runs
`domainlm prepare` with ``executor: slurm`` and a `domainlm launch slurm` training job, and both give what a
local run gives: the same prepared bytes, the same loss curve (also after a kill and ``scontrol requeue``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from domainlm.data.command import run_prepare
from domainlm.errors import UserError
from slurm_cluster import SlurmCluster, missing
from test_prepare import quiet_console, write_config, write_texts
from test_train_fixtures import losses, make_run, read_metrics, run_dir, set_train, single_thread, train_in_process


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(f"no test Slurm cluster: {why}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def slurm_env(cluster, monkeypatch):
    """sbatch/squeue of this process (and the jobs it submits) talk to the test cluster."""
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    return cluster


def tree(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "data").rglob("*")) if p.is_file()}


def sources(tmp: Path) -> list[dict]:
    docs = write_texts(tmp / "a", 40, seed=1)
    (tmp / "a" / "copy.txt").write_text(docs[0])  # an exact duplicate for the dedup stages to find
    return [{"name": "a", "role": "domain", "weight": 1.0, "input": str(tmp / "a")}]


def slurm_config(tmp: Path, srcs: list[dict], **slurm) -> Path:
    cfg = write_config(tmp, srcs, tasks=2, minhash_buckets=2, executor="slurm", slurm=slurm)
    data = yaml.safe_load(cfg.read_text())
    data["run_dir"] = str(tmp / "run-slurm")
    cfg.write_text(yaml.safe_dump(data))
    return cfg


@pytest.fixture(scope="module")
def local_prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    srcs = sources(tmp)
    run_prepare(write_config(tmp, srcs, tasks=2, minhash_buckets=2), quiet_console())
    return srcs, tree(tmp / "run")


def test_prepare_on_slurm_waits_and_matches_local(slurm_env, local_prepared, tmp_path):
    srcs, want = local_prepared
    result = run_prepare(slurm_config(tmp_path, srcs), quiet_console())
    assert "submitted" not in result["stats"]
    assert tree(tmp_path / "run-slurm") == want
    # every stage ran as a Slurm job array (one job id recorded per stage) and no task runs twice on a rerun
    jobs = sorted((tmp_path / "run-slurm" / ".prepare").rglob("stages/*/slurm_job_id"))
    assert len(jobs) == 8 and len({p.read_text() for p in jobs}) == len(jobs)
    log = next((tmp_path / "run-slurm" / ".prepare" / "a" / "stages" / "clean" / "slurm_logs").glob("*.out"))
    assert "launch_pickled_pipeline" in log.read_text()
    assert run_prepare(slurm_config(tmp_path, srcs), quiet_console())["stats"] == result["stats"]


def test_prepare_on_slurm_without_wait_then_rerun_writes_stats(slurm_env, local_prepared, tmp_path):
    srcs, want = local_prepared
    cfg = slurm_config(tmp_path, srcs, wait=False)
    result = run_prepare(cfg, quiet_console())
    assert result["stats"]["submitted"] == "slurm"
    assert not (tmp_path / "run-slurm" / "data" / "stats.json").exists()
    # the last stage of each source was submitted after (and depends on) the ones before it
    job = (tmp_path / "run-slurm" / ".prepare" / "a" / "stages" / "write" / "slurm_job_id").read_text()
    assert {r["JobState"] for r in slurm_env.wait_job(job)} == {"COMPLETED"}  # both tasks of the array
    assert run_prepare(cfg, quiet_console())["stats"]["sources"]["a"]["drops"]["exact_duplicate"] == 1
    assert tree(tmp_path / "run-slurm") == want


def test_prepare_on_slurm_refused_by_sbatch_is_one_line(slurm_env, tmp_path):
    cfg = slurm_config(tmp_path, sources(tmp_path), partition="nope")
    with pytest.raises(UserError, match=r"domainlm-a-clean: sbatch refused the job .* check prepare.slurm"):
        run_prepare(cfg, quiet_console())
    log = (tmp_path / "run-slurm" / ".prepare" / "a" / "datatrove.log").read_text()
    assert "invalid partition" in log.lower()


# ------------------------------------------------------------------------------------------- training

STEPS = 8


def test_launch_dry_run_writes_the_script(tmp_path, cli):
    cfg = make_run(tmp_path)
    code, out, err = cli("launch", "slurm", str(cfg), "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                         "--time", "2-00:00:00", "--dry-run", "--json")
    assert code == 0, err
    res = json.loads(out)
    script = Path(res["script"]).read_text()
    assert res["job_id"] is None and Path(res["script"]) == run_dir(cfg) / "launch" / "train.sbatch"
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --requeue", "--nproc-per-node=8", "--rdzv-backend=c10d",
                 f"-m domainlm train {cfg.resolve()}"):
        assert line in script, line
    code, _, err = cli("launch", "slurm", str(cfg), "--gpus-per-node", "1", "--time", "soon", "--dry-run")
    assert code == 2 and "--time" in err and err.strip().count("\n") == 0
    (run_dir(cfg) / "tokens" / "counts.json").unlink()
    code, _, err = cli("launch", "slurm", str(cfg), "--gpus-per-node", "1")
    assert code == 2 and "no token files to train on" in err and err.strip().count("\n") == 0


def test_launch_dry_run_of_the_7b_recipe_in_an_empty_folder(tmp_path, cli, monkeypatch):
    """The script is written before any data exists (to be read first), with the cluster's options: account, QOS,
    memory, whole nodes, features, GPUs as GRES; SIGUSR1 ahead of the time limit; the head node's address and a
    port below the ephemeral range for the rendezvous; NCCL errors that abort instead of hanging."""
    import re

    from domainlm.launch.slurm import RDZV_PORT_BASE, RDZV_PORTS

    monkeypatch.chdir(tmp_path)
    code, out, err = cli("launch", "slurm", "recipes/legal-7b-slurm.yaml", "--nodes", "8", "--gpus-per-node", "8",
                         "--dry-run")
    assert code == 0, err
    assert "no token files yet" in " ".join(out.split())
    script = (tmp_path / "runs" / "legal-7b" / "launch" / "train.sbatch").read_text()
    for line in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=USR1@300", "#SBATCH --requeue",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", '--rdzv-endpoint="$head_addr:$port"',
                 "-m domainlm.launch.torchrun"):
        assert line in script, line
    assert "recipes/legal-7b-slurm.yaml" in script and "--gres" not in script and "--mem" not in script
    assert RDZV_PORT_BASE + RDZV_PORTS <= 32768  # Linux's ephemeral ports start at 32768
    assert re.search(rf"port=\$\(\({RDZV_PORT_BASE} \+ SLURM_JOB_ID % {RDZV_PORTS}\)\)", script)
    code, _, err = cli("launch", "slurm", "recipes/legal-7b-slurm.yaml", "--nodes", "8", "--gpus-per-node", "8",
                       "--gres", "gpu:h100:8", "--account", "law", "--qos", "high", "--mem", "0", "--exclusive",
                       "--constraint", "h100&ib", "--signal-seconds", "600", "--dry-run")
    assert code == 0, err
    script = (tmp_path / "runs" / "legal-7b" / "launch" / "train.sbatch").read_text()
    for line in ("#SBATCH --gres=gpu:h100:8", "#SBATCH --account=law", "#SBATCH --qos=high", "#SBATCH --mem=0",
                 "#SBATCH --exclusive", "#SBATCH --constraint=h100&ib", "#SBATCH --signal=USR1@600"):
        assert line in script, line
    assert "--gpus-per-node" not in script
    for flag, bad in (("--mem", "lots"), ("--account", "a b"), ("--gres", "gpu;rm"), ("--signal-seconds", "70000")):
        code, _, err = cli("launch", "slurm", "recipes/legal-7b-slurm.yaml", "--gpus-per-node", "8", flag, bad,
                           "--dry-run")
        assert code == 2 and flag in err and err.strip().count("\n") == 0, (flag, err)


def test_torchrun_agent_survives_usr1_and_passes_it_to_its_ranks(tmp_path):
    """Slurm's ``--signal=USR1`` reaches the torchrun agent; plain torchrun dies of it. The agent the script runs
    passes it on: the rank signals its agent and waits for the signal to come back."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "os.kill(os.getppid(), signal.SIGUSR1)\n"
        "got = signal.sigtimedwait({signal.SIGUSR1}, 60)\n"
        "sys.exit(0 if got is not None else 3)\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("DOMAINLM_FAULT")}
    r = subprocess.run([sys.executable, "-m", "domainlm.launch.torchrun", "--standalone", "--nproc_per_node=1",
                        "--no-python", sys.executable, str(worker)], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_launch_without_slurm_is_one_line_error(tmp_path, cli, monkeypatch):
    cfg = make_run(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code, _, err = cli("launch", "slurm", str(cfg), "--gpus-per-node", "0")
    assert code == 2 and err.strip().count("\n") == 0 and "sbatch: command not found" in err
    assert (run_dir(cfg) / "launch" / "train.sbatch").exists()  # written before the submission failed


def test_launch_train_on_slurm_killed_requeued_resumes_same_curve(slurm_env, tmp_path):
    """Two gloo processes under srun + torchrun (c10d rendezvous from the Slurm environment) follow the loss
    curve of one local process; killed after its step-4 checkpoint and requeued, the job resumes from it."""
    with single_thread():
        ref = set_train(make_run(tmp_path / "ref"), lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=4,
                        eval_every=4, max_tokens=STEPS * 8 * 32)
        train_in_process(ref)
    cfg = set_train(make_run(tmp_path / "slurm"), lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=4,
                    eval_every=4, max_tokens=STEPS * 8 * 32, parallel="ddp")
    # each rank (its own process group under torchrun) kills itself at its 5th step: after the step-4 checkpoint
    env = {**slurm_env.env, "DOMAINLM_FAULT": "train.step:5", "DOMAINLM_FAULT_DIR": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "domainlm", "launch", "slurm", str(cfg), "--nodes", "1",
                        "--gpus-per-node", "0", "--procs-per-node", "2", "--json"],
                       env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)["job_id"]
    (first,) = slurm_env.wait_job(job)
    log = Path(json.loads(r.stdout)["log"])
    assert first["JobState"] == "FAILED", log.read_text()[-3000:]
    assert [m["step"] for m in read_metrics(run_dir(cfg))][-1] >= 4
    assert (run_dir(cfg) / "checkpoints" / "step-00000004").is_dir()
    slurm_env.run("scontrol", "requeue", job)  # refused for a job submitted without --requeue
    assert slurm_env.job(job)["Requeue"] == "1"  # waits for the old credential to expire (cred_expire=10)
    (second,) = slurm_env.wait_job(job)
    text = log.read_text()
    assert second["JobState"] == "COMPLETED", text[-3000:]
    assert "(restart 1)" in text and "2 process(es) (ddp)" in " ".join(text.split())
    got, want = losses(cfg), losses(ref)
    assert len(got) == len(want) == STEPS
    assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want, strict=True)), (got, want)


def test_launch_train_on_slurm_usr1_checkpoints_requeues_itself_and_resumes(slurm_env, tmp_path):
    """SIGUSR1 to rank 1 after step 6 (fault injection: what ``--signal=USR1@N`` sends ahead of the time limit):
    both ranks checkpoint step 6, rank 0 runs ``scontrol requeue`` from inside the job, and the job, run again
    under the same id, resumes to the one-process loss curve."""
    with single_thread():
        ref = set_train(make_run(tmp_path / "ref"), lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=4,
                        eval_every=4, max_tokens=STEPS * 8 * 32)
        train_in_process(ref)
    cfg = set_train(make_run(tmp_path / "slurm"), lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=4,
                    eval_every=4, max_tokens=STEPS * 8 * 32, parallel="ddp")
    # counted per process: the requeued run (steps 7-8) does not reach a 6th hit
    env = {**slurm_env.env, "DOMAINLM_FAULT": "train.step:6:USR1", "DOMAINLM_FAULT_RANK": "1",
           "DOMAINLM_FAULT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "domainlm", "launch", "slurm", str(cfg), "--nodes", "1",
                        "--gpus-per-node", "0", "--procs-per-node", "2", "--json"],
                       env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    job, log = json.loads(r.stdout)["job_id"], Path(json.loads(r.stdout)["log"])
    assert "#SBATCH --signal=USR1@300" in (run_dir(cfg) / "launch" / "train.sbatch").read_text()
    (rec,) = slurm_env.wait_job(job)
    text = " ".join(log.read_text().split())
    assert rec["JobState"] == "COMPLETED" and int(rec["Restarts"]) == 1, text[-3000:]
    assert "train: stopped by a signal after step 6/8" in text and "(restart 1)" in text, text[-3000:]
    assert "resuming from" in text and "step-00000006" in text
    got, want = losses(cfg), losses(ref)
    assert len(got) == len(want) == STEPS
    assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want, strict=True)), (got, want)
