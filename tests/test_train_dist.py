"""Distributed training on CPU (torchrun, gloo): 2-process DDP and FSDP2 follow the 1-process loss curve for
the same global batch, and an FSDP checkpoint (torch.distributed.checkpoint) resumes on another process count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from test_train_fixtures import (  # noqa: F401 (one_thread: autouse fixture)
    cli_subprocess,
    clone_run,
    losses,
    make_run,
    one_thread,
    read_metrics,
    run_dir,
    set_train,
    single_thread,
    train_in_process,
    weights,
)

STEPS = 8
REL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 8 × 32 tokens as 2 micro-batches of 4; constant LR so that a run stopped
    early and resumed follows the same curve."""
    with single_thread():
        cfg = set_train(make_run(tmp_path_factory.mktemp("ref")), lr=3e-3, warmup_steps=0, min_lr_ratio=1.0,
                        checkpoint_every=4, eval_every=4)
        train_in_process(cfg, max_steps=STEPS)
    return cfg


def assert_close_curves(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= REL * abs(w), (got, want)


def fresh_clone(reference, dst, **overrides):
    import shutil

    cfg = clone_run(reference, dst, **overrides)
    for p in ("checkpoints", "logs", "model", ".stages"):
        shutil.rmtree(run_dir(cfg) / p, ignore_errors=True)
    return cfg


def test_ddp_two_processes_match_one(reference, tmp_path):
    cfg = fresh_clone(reference, tmp_path, parallel="ddp")
    proc = cli_subprocess(["train", str(cfg), "--max-steps", str(STEPS)], torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) (ddp)" in " ".join(proc.stderr.split())
    assert_close_curves(losses(cfg), losses(reference))
    a, b = weights(run_dir(reference) / "model"), weights(run_dir(cfg) / "model")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_fsdp_two_processes_match_one_and_resume_on_one(reference, tmp_path):
    cfg = fresh_clone(reference, tmp_path, parallel="fsdp")
    proc = cli_subprocess(["train", str(cfg), "--max-steps", str(STEPS // 2)], torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) (fsdp)" in " ".join(proc.stderr.split())
    assert_close_curves(losses(cfg), losses(reference)[: STEPS // 2])
    assert (run_dir(cfg) / "checkpoints" / f"step-{STEPS // 2:08d}" / "dcp").is_dir()
    plain = clone_run(cfg, tmp_path / "plain", parallel="auto")  # before cfg's run goes on
    # Resume the 2-process sharded checkpoint on 1 process (still FSDP): DCP reshards on load.
    train_in_process(cfg, max_steps=STEPS)
    assert_close_curves(losses(cfg), losses(reference))
    # ... and into a plain single-process model (no process group at all).
    train_in_process(plain, max_steps=STEPS)
    assert_close_curves(losses(plain), losses(reference))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(cfg, steps: int, *, fault_node: int | None = None, fault: str = "", fault_dir: Path | None = None):
    """Two torchrun "nodes" on this host, one process each, meeting at a c10d rendezvous on localhost — the
    multi-node launch of docs/training.md with ``--nnodes 2``. Each node is its own session (process group), as
    on two machines: a fault kills one node only."""
    import os
    import subprocess

    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for node in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("DOMAINLM_FAULT", None)
        if node == fault_node:
            env.update(DOMAINLM_FAULT=fault, DOMAINLM_FAULT_DIR=str(fault_dir))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=domainlm-test",
               "--max_restarts=0", "-m", "domainlm", "train", str(cfg), "--max-steps", str(steps)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def wait_nodes(procs, timeout: float = 120) -> list[tuple[int, str]]:
    import os
    import signal
    import subprocess

    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a node left hanging would be a bug: end it and fail below
            os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate()
            err += "\n(hung: killed by the test)"
        out.append((p.returncode, err))
    return out


def test_two_nodes_match_one_process_and_resume_after_a_node_is_killed(reference, tmp_path):
    """Node 1's training process is SIGKILLed (by fault injection) after step 6 of 8 and its torchrun agent
    fails; node 0 then fails on its own (its peer is gone). Restarting both nodes resumes from the step-4
    checkpoint, and the loss curve of the two-node run — steps 1–4 before the kill, 5–8 after the restart — is
    the one-process curve."""
    cfg = fresh_clone(reference, tmp_path, parallel="ddp")
    (node0, err0), (node1, err1) = wait_nodes(start_nodes(cfg, STEPS, fault_node=1, fault="train.step:6",
                                                          fault_dir=tmp_path))
    assert node1 != 0 and "Signal 9 (SIGKILL)" in err1, err1[-3000:]  # torchrun runs workers in their own group
    assert node0 != 0 and "hung" not in err0, err0[-3000:]
    assert [p.name for p in (run_dir(cfg) / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-00000004"]
    assert "2 process(es) (ddp)" in " ".join((err0 + err1).split())
    assert_close_curves(losses(cfg)[:4], losses(reference)[:4])

    done = wait_nodes(start_nodes(cfg, STEPS))
    assert [rc for rc, _ in done] == [0, 0], "\n".join(err[-3000:] for _, err in done)
    assert "resuming from" in " ".join("".join(err for _, err in done).split())
    assert_close_curves(losses(cfg), losses(reference))
    a, b = weights(run_dir(reference) / "model"), weights(run_dir(cfg) / "model")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_on_cuda_bf16_params_fp32_states_fused_adamw(cpu_offload):
    """FSDP2 as the trainer sets it up on CUDA: fp32 sharded parameters (the master weights), bf16 compute
    without autocast, fp32 gradients, fused AdamW, activation checkpointing; the loss follows an fp32 model's
    to bf16 precision. With CPU offload the sharded states live in host memory."""
    import copy

    from torch.distributed.tensor import DTensor

    from domainlm.config import TrainConfig
    from domainlm.model import build_model
    from domainlm.shape import ModelShape
    from domainlm.train.parallel import Dist, parallelize, shutdown, step_precision
    from domainlm.train.step import make_optimizer, next_token_loss, train_step

    world = Dist(0, 1, 0, torch.device("cuda", 0))
    shape = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=300,
                       tie_embeddings=False)
    plain = build_model(shape, 64, seed=0).to(world.device)
    model = parallelize(copy.deepcopy(plain), "fsdp", world, activation_checkpointing=True, precision="bf16-mixed",
                        cpu_offload=cpu_offload)
    try:
        assert step_precision("fsdp", world, "bf16-mixed") == "fp32"  # no autocast on top of FSDP's own casts
        for p in model.parameters():
            assert isinstance(p, DTensor) and p.dtype == torch.float32
            assert p.device.type == ("cpu" if cpu_offload else "cuda")
        seen = []
        q_proj = model.model.layers[0]._checkpoint_wrapped_module.self_attn.q_proj
        q_proj.register_forward_pre_hook(lambda m, args: seen.append((m.weight.dtype, args[0].dtype)))
        batch = torch.randint(0, 300, (8, 33), generator=torch.Generator().manual_seed(0)).to(world.device)
        loss = next_token_loss(model, batch)
        loss.backward()
        assert seen[0] == (torch.bfloat16, torch.bfloat16)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        want = next_token_loss(plain, batch).item()
        assert abs(loss.item() - want) <= 2e-2 * abs(want)
        t = TrainConfig()
        optimizer = make_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, device=world.device)
        assert optimizer.defaults["fused"]
        optimizer.zero_grad(set_to_none=True)
        res = train_step(model, optimizer, batch, lr=1e-3, micro_batch=4, grad_clip=1.0, precision="fp32")
        assert not res.skipped and abs(res.loss - want) <= 2e-2 * abs(want)
    finally:
        shutdown()
