"""Tiny, self-contained training runs for the train/model tests: a BPE tokenizer trained on a few sentences,
token files written with the real `TokenWriter`, and a config for a 2-layer, d_model-32 Llama."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from domainlm.data.tokens import TokenWriter, dtype_for, token_path, write_counts

LEGAL = [
    "The licensee shall indemnify the licensor against all claims arising from use of the software.",
    "This license is irrevocable, royalty-free and worldwide, notwithstanding any other provision.",
    "Redistribution in source and binary forms, with or without modification, is permitted.",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
    "In consideration of the mutual covenants herein, the parties agree as follows.",
]
NEWS = [
    "The government announced a new budget for schools and hospitals on Tuesday.",
    "Shares in the company rose sharply after the quarterly results were published.",
    "The team won the final match of the season in front of a home crowd.",
    "A new film by the director opened to strong reviews at the festival.",
]


def make_tokenizer(out: Path, vocab_size: int = 300, texts: list[str] | None = None) -> Path:
    """A tiny byte-level BPE in HF format (<s>, </s>, <pad> = 0, 1, 2) saved to ``out``; returns ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else LEGAL + NEWS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return out


def make_tiny_model(out: Path, texts: list[str], vocab_size: int = 400) -> Path:
    """An HF model folder: a random 2-layer Llama (hidden 32, context 64) and a BPE trained on ``texts``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(make_tokenizer(out, vocab_size, texts))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def make_run(tmp: Path, *, train_docs: int = 60, seq_len: int = 32, **train_overrides) -> Path:
    """A run directory with tokenizer/, tokens/ and config.yaml; returns the config path."""
    from transformers import AutoTokenizer

    run = tmp / "run"
    tok = AutoTokenizer.from_pretrained(make_tokenizer(run / "tokenizer"))
    vocab = len(tok)
    eos = tok.eos_token_id
    dtype = dtype_for(vocab)
    rng = np.random.default_rng(0)
    sources = {}
    for name, texts in (("legal", LEGAL), ("news", NEWS)):
        row = {}
        for split, n_docs in (("train", train_docs), ("val", 12)):
            n_bytes = 0
            with TokenWriter(token_path(run, name, split), dtype) as w:
                for _ in range(n_docs):
                    text = " ".join(rng.choice(texts, size=2))
                    w.write(tok(text).input_ids + [eos])
                    n_bytes += len(text.encode())
            row.update({f"{split}_tokens": w.n_tokens, f"{split}_docs": n_docs, f"{split}_bytes": n_bytes})
        sources[name] = row
    write_counts(run, {"dtype": dtype.name, "vocab_size": vocab, "eos_id": eos, "tokenizer_sha256": "test",
                       "sources": sources})
    train = {"seq_len": seq_len, "micro_batch": 4, "tokens_per_step": 8 * seq_len, "max_tokens": 40 * 8 * seq_len,
             "lr": 1e-2, "warmup_steps": 3, "eval_every": 10, "checkpoint_every": 10, "eval_tokens": 256,
             "keep_checkpoints": 3}
    train.update(train_overrides)
    cfg = {
        "name": "tiny",
        "run_dir": str(run),
        "sources": [{"name": "legal", "role": "domain", "weight": 0.5, "input": "package:licensedcode"},
                    {"name": "news", "role": "general", "weight": 0.5, "input": "package:bbc-news"}],
        "tokenizer": {"vocab_size": 300},
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
        "train": train,
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@contextlib.contextmanager
def single_thread():
    """Tiny models run ~30× faster on one thread on a loaded 2-core machine, and one thread per process makes
    in-process and subprocess runs compute bit-identical results."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def one_thread():
    """Imported by a test module, runs each of its tests on one thread (see `single_thread`)."""
    with single_thread():
        yield


def read_metrics(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def losses(cfg_path: Path) -> list[float]:
    """Per-step train losses of a run, in order."""
    return [r["loss"] for r in read_metrics(run_dir(cfg_path))]


TRAIN_OUTPUTS = ("checkpoints", "logs", "model", ".stages")


def clone_run(cfg_path: Path, dst: Path, *, fresh: bool = False, **train_overrides) -> Path:
    """Copy a run directory (tokenizer and token files) to ``dst``; returns the new config path. With
    ``fresh``, the copy leaves out what training wrote (checkpoints, logs, export, stage markers)."""
    import shutil

    cfg = yaml.safe_load(cfg_path.read_text())
    ignore = shutil.ignore_patterns(*TRAIN_OUTPUTS) if fresh else None
    shutil.copytree(cfg["run_dir"], dst / "run", ignore=ignore)
    cfg["run_dir"] = str(dst / "run")
    cfg["train"].update(train_overrides)
    out = dst / cfg_path.name
    out.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return out


def set_train(cfg_path: Path, **train_overrides) -> Path:
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["train"].update(train_overrides)
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return cfg_path


def run_dir(cfg_path: Path) -> Path:
    return Path(yaml.safe_load(cfg_path.read_text())["run_dir"])


def train_in_process(cfg_path: Path, **kw) -> dict:
    import io

    from rich.console import Console

    from domainlm.train.loop import run_training

    return run_training(cfg_path, console=Console(file=io.StringIO()), **kw)


def cli_subprocess(args: list[str], patch: str = "", timeout: float = 180, torchrun: int = 0):
    """`domainlm ARGS` in a fresh process (for SIGKILL and torchrun), one thread per process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "domainlm", *args]
    else:
        code = f"import os, signal\n{patch}\nfrom domainlm.cli import main\nmain({args!r})\n"
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))
