"""Training at cluster scale, on 2 CPU processes (torchrun, gloo, FSDP2 as ``parallel: zero2``): a run preempted
by SIGUSR1 (delivered to one rank by fault injection, as Slurm's ``--signal`` would) checkpoints at the step
boundary on both ranks and exits 75; each rank writes, hashes and on resume opens only its own shard; the resumed
curve is the one-process curve; validation with fewer windows (1) than ranks (2) gives the one-process numbers;
a meta-initialised model is the eager one; the plan recommends only what the trainer runs; HF_ENDPOINT's port."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from test_train_fixtures import (  # noqa: F401 (one_thread: autouse fixture)
    losses,
    make_run,
    one_thread,
    read_metrics,
    run_dir,
    set_train,
    single_thread,
    train_in_process,
)

STEPS = 8
REL = 1e-5
SEQ = 32

# Installed in each process of the resumed run (PYTHONPATH): every file it opens under checkpoints/, one log per rank.
OPEN_LOG = '''
import os, sys
_out = os.environ.get("TEST_OPEN_LOG")
if _out and "RANK" in os.environ:
    _log = open(os.path.join(_out, "opened-" + os.environ["RANK"]), "w", buffering=1)
    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if "/checkpoints/" in path:
                _log.write(os.path.realpath(path) + "\\n")
    sys.addaudithook(_hook)
'''


def close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(g - w) <= REL * abs(w) for g, w in zip(got, want, strict=True))


def torchrun(cfg: Path, env: dict, tmp: Path):
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "domainlm",
           "train", str(cfg)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference, and the same run on 2 FSDP ranks: rank 1 alone gets SIGUSR1 after step 3, then
    the run is restarted with every checkpoint file each rank opens logged. Constant LR, 1 validation window of
    32 tokens per source (eval_tokens 32 < 2 ranks × 32)."""
    tmp = tmp_path_factory.mktemp("cluster")
    train = dict(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=4, eval_every=4, eval_tokens=SEQ,
                 max_tokens=STEPS * 8 * SEQ)
    with single_thread():
        ref = set_train(make_run(tmp / "ref"), **train)
        train_in_process(ref)
    cfg = set_train(make_run(tmp / "dist"), parallel="zero2", **train)
    first = torchrun(cfg, {"DOMAINLM_FAULT": "train.step:3:USR1", "DOMAINLM_FAULT_RANK": "1",
                           "DOMAINLM_FAULT_DIR": str(tmp)}, tmp)
    ckpts = sorted(p.name for p in (run_dir(cfg) / "checkpoints").iterdir())
    first_losses = losses(cfg)
    hook = tmp / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OPEN_LOG)
    (tmp / "opened").mkdir()
    second = torchrun(cfg, {"TEST_OPEN_LOG": str(tmp / "opened"),
                            "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}, tmp)
    return {"ref": ref, "cfg": cfg, "first": first, "ckpts": ckpts, "first_losses": first_losses, "second": second,
            "opened": {r: (tmp / "opened" / f"opened-{r}").read_text().split() for r in (0, 1)}}


def test_usr1_on_one_rank_checkpoints_both_at_the_step_boundary_and_exits_75(runs):
    first, cfg = runs["first"], runs["cfg"]
    text = " ".join(first.stderr.split())
    assert first.returncode != 0 and "exitcode : 75" in text, first.stderr[-3000:]
    assert "train: stopped by a signal after step 3/8" in text and "rerun the same command to resume" in text
    assert "2 process(es) (zero2)" in text
    # both ranks stopped after step 3 (rank 0 never got the signal): one checkpoint, of step 3
    assert runs["ckpts"] == ["step-00000003"]
    assert close(runs["first_losses"], losses(runs["ref"])[:3])
    ck = run_dir(cfg) / "checkpoints" / "step-00000003"
    index = json.loads((ck / "manifest.json").read_text())
    assert index["world_size"] == 2 and sorted(index["manifests"]) == ["manifest-0.json", "manifest-1.json"]
    m0, m1 = (json.loads((ck / f"manifest-{r}.json").read_text()) for r in (0, 1))
    # each rank hashed only what it wrote: its shard, its RNG (rank 0: also the shared, small files)
    assert sorted(m1) == ["dcp/__1_0.distcp", "rng-1.pt"]
    assert sorted(m0) == ["dcp/.metadata", "dcp/__0_0.distcp", "rng-0.pt", "shared.pt", "state.json"]


def test_resume_opens_only_its_own_shard_and_follows_the_one_process_curve(runs):
    second, cfg, ref = runs["second"], runs["cfg"], runs["ref"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    ck = (run_dir(cfg) / "checkpoints" / "step-00000003").resolve()
    for rank, other in ((0, 1), (1, 0)):
        opened = {Path(p).relative_to(ck).as_posix() for p in runs["opened"][rank] if Path(p).is_relative_to(ck)}
        assert f"dcp/__{rank}_0.distcp" in opened and f"rng-{rank}.pt" in opened, opened
        assert not {f"dcp/__{other}_0.distcp", f"rng-{other}.pt", f"manifest-{other}.json"} & opened, (rank, opened)
    assert close(losses(cfg), losses(ref))


def test_validation_with_fewer_windows_than_ranks_is_the_one_process_number(runs):
    got, want = read_metrics(run_dir(runs["cfg"]), "eval"), read_metrics(run_dir(runs["ref"]), "eval")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8]
    for g, w in zip(got, want, strict=True):
        keys = {k for k in w if k.startswith(("val_loss/", "bpb/"))}
        assert keys == {"val_loss/legal", "val_loss/news", "bpb/legal", "bpb/news"} and keys <= set(g)
        assert all(abs(g[k] - w[k]) <= REL * abs(w[k]) for k in keys), (g, w)


# ------------------------------------------------------------------------------------------ meta-device init

META_CHECK = '''
import sys, torch
from domainlm.model import build_model, seeded_init
from domainlm.shape import make_shape
from domainlm.train.parallel import init_distributed, parallelize, shutdown
world = init_distributed()
bad = []
for tie in (False, True):
    shape = make_shape(32, 2, 301, tie_embeddings=tie)  # 301 rows: shards of 151 and 150
    eager = build_model(shape, 64, seed=7)
    meta = build_model(shape, 64, seed=7, meta=True)
    model = parallelize(meta, "fsdp", world, activation_checkpointing=True, init=lambda m: seeded_init(m, 7))
    want = dict(eager.named_parameters(remove_duplicate=False))
    for name, p in model.named_parameters(remove_duplicate=False):
        name = name.replace("._checkpoint_wrapped_module", "")
        local = p.to_local()
        if local.shape[0] >= p.shape[0] or not torch.equal(p.full_tensor(), want.pop(name)):
            bad.append((tie, name))
    bad += [(tie, "missing " + k) for k in want]
    bad += [(tie, "head not tied")] if tie and model.lm_head.weight is not model.model.embed_tokens.weight else []
    bad += [(tie, "rope")] if not torch.equal(model.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq) else []
print("rank", world.rank, "bad", bad, flush=True)
shutdown()
sys.exit(1 if bad else 0)
'''


def test_meta_init_equals_eager_init_bit_for_bit(tmp_path):
    """A model built on the meta device and materialised after `parallelize` — whole on one process, or FSDP2
    shards of 2 ranks (each allocating only its shard) — has the weights `build_model` gives, bit for bit,
    tied head or not."""
    import subprocess

    import torch

    from domainlm.model import build_model, seeded_init
    from domainlm.shape import make_shape
    from domainlm.train.parallel import Dist, parallelize

    for tie in (False, True):
        shape = make_shape(32, 2, 300, tie_embeddings=tie)
        eager = build_model(shape, 64, seed=7)
        model = parallelize(build_model(shape, 64, seed=7, meta=True), "none", Dist(0, 1, 0, torch.device("cpu")),
                            init=lambda m: seeded_init(m, 7))
        a, b = eager.state_dict(), model.state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert not torch.equal(build_model(shape, 64, seed=8).lm_head.weight, eager.lm_head.weight)  # the seed counts
    script = tmp_path / "meta_check.py"
    script.write_text(META_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.count("bad []") == 2, r.stdout + r.stderr[-3000:]


# ------------------------------------------------------------------------------------------ the Hub's endpoint


def test_hub_probe_uses_hf_endpoint_scheme_and_port(monkeypatch):
    """A mirror at HF_ENDPOINT=http://127.0.0.1:<port> is probed on that port (not 443): reachable while it
    answers HTTP, unreachable (naming host and port) once closed. Local sockets only."""
    import socket
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from domainlm.data.sources import _hub_unreachable

    class Mirror(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Mirror)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert _hub_unreachable() is None
    finally:
        server.shutdown()
        server.server_close()
    why = _hub_unreachable()
    assert why is not None and why.startswith(f"127.0.0.1:{port}: ")
    seen, asked = [], []
    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout: seen.append(addr) or socket.socket())
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: asked.append(url) or socket.socket())
    for endpoint, want in (("http://mirror.local", ("mirror.local", 80)), ("https://hub.example", ("hub.example", 443)),
                           ("https://hub.example:8443/", ("hub.example", 8443))):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert _hub_unreachable() is None
        assert seen[-1] == want and asked[-1].startswith(endpoint.rstrip("/") + "/api/")


# ------------------------------------------------------------------------------------------ sizing


def test_plan_recommends_only_what_the_trainer_runs_and_the_cards_own_peak():
    from domainlm import memory as M
    from domainlm.hardware import accelerator_of

    # ZeRO-1 (31.4 GB of states + 12.2 GB of activations, tests/test_memory.py) would fit 45 GB; the trainer has no
    # ZeRO-1, so the plan recommends ZeRO-2, train.parallel: zero2
    rec, ests = M.recommend(45, params=7.5e9, gpus=64, seq_len=2048, micro_batch=1, n_layers=32, d_model=4096)
    assert ests["zero1"].total_gb <= 45 < ests["ddp"].total_gb and rec == "zero2"
    assert M.TRAIN_PARALLEL[rec] == "zero2" and "train.parallel: zero2" in M.SHARDING_NAMES[rec]
    for name, mem, key in (("NVIDIA H100 80GB HBM3", 85, "h100"), ("NVIDIA H100 PCIe", 85, "h100-pcie"),
                           ("NVIDIA H100 NVL", 100, "h100-nvl"), ("NVIDIA H200", 150, "h200"),
                           ("NVIDIA H200 NVL", 150, "h200-nvl"), ("NVIDIA A100-SXM4-40GB", 42, "a100-40gb"),
                           ("NVIDIA A100 80GB PCIe", 85, "a100-80gb"), ("NVIDIA L4", 24, "l4")):
        assert accelerator_of(name, mem).name == key, name
    assert accelerator_of("NVIDIA H100 PCIe", 85).bf16_flops == 756e12  # datasheet: 1,513 with sparsity
    assert accelerator_of("Tesla T4", 16) is None
