"""Continued pretraining (`train.init_from`, docs/continued.md): a model that is not domainlm's — a randomly
initialised GPT-2 with its own BPE tokenizer (only <|endoftext|>: no BOS, no PAD), saved with `save_pretrained` —
continued on the packaged demo text: its own token files, exact resume after SIGKILL, an export transformers loads,
the re-warmed schedule, the plan with N fixed, and bad bases."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from crashkit import KILLED, domainlm, stamps, tree
from domainlm.errors import UserError
from test_prepare import quiet_console, train_tokenizer
from test_train_fixtures import (  # noqa: F401 (one_thread: autouse fixture)
    clone_run,
    losses,
    one_thread,
    read_metrics,
    run_dir,
    single_thread,
    train_in_process,
    weights,
)

STEPS = 20  # checkpoints every 10
EOT = "<|endoftext|>"
TRAIN = {"seq_len": 32, "micro_batch": 4, "tokens_per_step": 256, "max_tokens": STEPS * 256, "lr": 1e-2,
         "warmup_steps": 3, "eval_every": 10, "checkpoint_every": 10, "eval_tokens": 256, "keep_checkpoints": 3}


def make_gpt2(out: Path, texts: list[str], seed: int = 0) -> Path:
    """A GPT-2 (n_embd 32, 2 layers, context 64, dropout as GPT-2's 0.1) and a byte-level BPE trained on
    ``texts`` whose only special token is <|endoftext|>, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=[EOT],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT)
    tok.save_pretrained(out)
    eot = tok.convert_tokens_to_ids(EOT)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=eot, eos_token_id=eot)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The packaged demo text prepared (40 documents per source), the run's own tokenizer and token files, a
    GPT-2 base outside the run, the base tokenizer's token files, and a config continuing the base."""
    from domainlm.config import load_config
    from domainlm.data import pipeline
    from domainlm.data.command import run_prepare
    from domainlm.data.tokenize import tokenize
    from domainlm.rundir import RunDir
    from domainlm.tokenize import run_tokenize

    tmp = tmp_path_factory.mktemp("continued")
    run = tmp / "run"
    cfg = {"name": "cont", "run_dir": str(run),
           "sources": [{"name": "legal", "role": "domain", "weight": 0.5, "input": "package:licensedcode",
                        "max_docs": 40},
                       {"name": "news", "role": "general", "weight": 0.5, "input": "package:bbc-news",
                        "max_docs": 40}],
           "prepare": {"workers": 1, "near_dup": False},
           "train": {**TRAIN, "init_from": "base"}}  # relative: to the config file's folder
    path = tmp / "cont.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with single_thread():
        run_prepare(path, quiet_console())
        texts = [t for s in ("legal", "news") for t in pipeline.iter_documents(run, s, "train")]
        train_tokenizer(run, texts)
        own = tokenize(run, None)
        own_tree, own_stamps = tree(run, RunDir.TOKENS), stamps(run, RunDir.TOKENS)
        base = make_gpt2(tmp / "base", texts)
        assert load_config(path).train.init_from == str(base)
        tok = run_tokenize(path, quiet_console())  # with train.init_from: the base model's tokenizer
        assert tok["tokens"] == str(RunDir(run).tokens_for(base))
        summary = train_in_process(path, max_steps=STEPS)
    return {"cfg": path, "run": run, "base": base, "own_counts": own, "own_tree": own_tree,
            "own_stamps": own_stamps, "summary": summary}


def test_base_tokenizer_has_its_own_token_files(prepared):
    from transformers import AutoTokenizer

    from domainlm.data import pipeline
    from domainlm.data.tokens import load_counts, open_tokens
    from domainlm.rundir import RunDir

    run, base = prepared["run"], prepared["base"]
    assert tree(run, RunDir.TOKENS) == prepared["own_tree"]  # the run's own token files: untouched, not rewritten
    assert stamps(run, RunDir.TOKENS) == prepared["own_stamps"]
    folder = RunDir(run).tokens_for(base)
    assert folder != RunDir(run).tokens_for() and folder.name.startswith("tokens-")
    counts = load_counts(folder)
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.bos_token is None and tok.pad_token is None
    assert counts["eos_id"] == tok.convert_tokens_to_ids(EOT) and counts["vocab_size"] == len(tok)
    assert prepared["own_counts"]["vocab_size"] == 400  # the run's own tokenizer: another vocabulary
    for name, c in counts["sources"].items():  # one EOS after every document, in the base tokenizer's ids
        val = open_tokens(folder, name, "val", counts)
        assert int((val == counts["eos_id"]).sum()) == c["val_docs"]
    first_doc = next(iter(pipeline.iter_documents(run, "legal", "val")))
    ids = tok(first_doc, add_special_tokens=False).input_ids
    assert list(open_tokens(folder, "legal", "val", counts)[: len(ids) + 1]) == ids + [counts["eos_id"]]


def test_model_comes_from_the_base(prepared):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from domainlm.config import load_config
    from domainlm.train.loop import initial_model, setup
    from domainlm.train.parallel import Dist

    cfg = load_config(prepared["cfg"])
    z = setup(cfg, prepared["run"], Dist(0, 1, 0, torch.device("cpu")), None)
    assert z.base is not None and z.tokenizer == prepared["base"] and z.max_pos == 64
    assert z.shape.d_model == 32 and z.shape.n_layers == 2 and z.shape.vocab_size == 512
    model = initial_model(z, 0, AutoTokenizer.from_pretrained(z.tokenizer), z.counts["eos_id"])
    assert type(model).__name__ == "GPT2LMHeadModel" and model.training
    saved = load_file(str(prepared["base"] / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert z.base.params == sum(p.numel() for p in model.parameters())  # tied head counted once
    from domainlm.model.base import resolve_base

    again = resolve_base(prepared["run"])  # a run directory: its export, here a continued GPT-2
    assert again.path == prepared["run"] / "model" and again.architecture == "GPT2LMHeadModel"
    assert again.params == z.base.params and again.fingerprint != z.base.fingerprint


def test_learning_rate_is_rewarmed_and_redecayed(prepared):
    """Ibrahim et al. 2024: re-warm to the max LR, then cosine-decay — the schedule of a run from scratch, restarted
    at step 0 for the base (which brings no optimizer state and no step count)."""
    from domainlm.train.schedule import lr_at

    rows = read_metrics(prepared["run"])
    lrs = [r["lr"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert lrs == [lr_at(s, lr=1e-2, total_steps=STEPS, warmup_steps=3) for s in range(STEPS)]
    assert lrs[0] == pytest.approx(1e-2 / 3) and lrs[2] == pytest.approx(1e-2)  # re-warmed from ~0 to the max
    assert lrs[-1] == pytest.approx(1e-3)  # decayed to min_lr_ratio 0.1 × max
    ls = losses(prepared["cfg"])
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.5, ls
    evals = read_metrics(prepared["run"], "eval")
    assert [e["step"] for e in evals] == [10, 20] and evals[-1]["bpb/legal"] < evals[0]["bpb/legal"]
    s = prepared["summary"]
    assert s["steps"] == STEPS and s["params"] == 43_904


def test_export_is_the_base_architecture_and_reproduces_logits(prepared):
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, base = prepared["run"], prepared["base"]
    hf = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.n_embd == 32
    assert tok.eos_token == EOT and tok.bos_token is None
    assert sorted(p.name for p in (run / "model").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    trained = AutoModelForCausalLM.from_pretrained(base)  # the base, with the last checkpoint's weights
    load_model(trained, str(run / "checkpoints" / "step-00000020" / "model.safetensors"))
    ids = tok("The licensee shall indemnify the licensor", return_tensors="pt").input_ids
    assert ids.tolist() == AutoTokenizer.from_pretrained(base)(
        "The licensee shall indemnify the licensor", return_tensors="pt").input_ids.tolist()
    hf.eval()
    trained.eval()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, trained(ids).logits)
        base_logits = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert not torch.equal(hf(ids).logits, base_logits)  # it did train


def test_sigkill_then_resume_is_bitwise_identical(prepared, tmp_path):
    """Killed after step 13 (checkpoint 10 on disk), resumed: the same losses, evals and weights, bit for bit,
    as the uninterrupted run — with GPT-2's dropout on, so the RNG state is part of what resumes."""
    ref = prepared["cfg"]
    cfg = clone_run(ref, tmp_path, fresh=True)
    data = yaml.safe_load(cfg.read_text())
    data["train"]["init_from"] = str(prepared["base"])  # the clone's config lives elsewhere: an absolute path
    cfg.write_text(yaml.safe_dump(data))
    proc = domainlm(["train", str(cfg), "--max-steps", str(STEPS)], fault="train.step:13", fault_dir=tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    run = run_dir(cfg)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000010"]
    assert read_metrics(run)[-1]["step"] == 13 and not (run / "model").exists()
    train_in_process(cfg, max_steps=STEPS)
    assert losses(cfg) == losses(ref)
    assert read_metrics(run, "eval") == read_metrics(prepared["run"], "eval")
    a, b = weights(prepared["run"] / "model"), weights(run / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_skips_and_another_base_retrains(prepared, tmp_path):
    ref = prepared["cfg"]
    before = (prepared["run"] / "logs" / "metrics.jsonl").read_text()
    assert train_in_process(ref, max_steps=STEPS)["steps"] == STEPS
    assert (prepared["run"] / "logs" / "metrics.jsonl").read_text() == before  # same base: done already
    cfg = clone_run(ref, tmp_path)  # trained copy: checkpoints, model and stage marker included
    other = shutil.copytree(prepared["base"], tmp_path / "other-base")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        m.transformer.ln_f.weight.mul_(2.0)
    m.save_pretrained(other)  # the same tokenizer (same token files), other weights
    data = yaml.safe_load(cfg.read_text())
    data["train"]["init_from"] = str(other)
    cfg.write_text(yaml.safe_dump(data))
    from domainlm import stages

    fp_before = stages.recorded(run_dir(cfg), "train")["fingerprint"]
    train_in_process(cfg, max_steps=STEPS, restart=True)
    assert stages.recorded(run_dir(cfg), "train")["fingerprint"] != fp_before
    assert losses(cfg) != losses(ref)


def test_report_shows_the_base_tokenizers_tokens(prepared):
    from domainlm.data.tokens import load_counts
    from domainlm.pipeline import catalog
    from domainlm.report.html import Report, data_section
    from domainlm.rundir import RunDir
    from domainlm.units import human

    counts = load_counts(RunDir(prepared["run"]).tokens_for(prepared["base"]))
    s = data_section(Report(prepared["run"], catalog()))
    html = "".join(s.body)
    assert "<h3>Tokens</h3>" in html and not any("tokens/counts.json" in h for h in s.hints), s.hints
    assert human(counts["sources"]["legal"]["train_tokens"]) in html  # the base tokenizer's count, not the run's


def test_ablation_variants_continue_the_same_base(prepared):
    """`domainlm ablate` (and `domainlm run`'s general-only baseline) on a continued run: each variant continues the
    base on its tokenizer's token files with other replay weights; no model shape is written into its config."""
    from domainlm.config import load_config
    from domainlm.train.variants import variant_config

    vcfg = variant_config(load_config(prepared["cfg"]), prepared["run"], 0.25)
    assert vcfg.train.init_from == str(prepared["base"]) and vcfg.model.d_model is None
    assert {s.name: s.weight for s in vcfg.sources} == {"legal": 0.25, "news": 0.75}
    assert vcfg.train.max_tokens == STEPS * 256


def test_plan_fixes_n_to_the_base(prepared, tmp_path, cli):
    from domainlm.plan.command import run_plan
    from domainlm.plan.report import print_plan

    src = yaml.safe_load(prepared["cfg"].read_text())
    src["run_dir"] = str(tmp_path / "planrun")
    src["train"]["init_from"] = str(prepared["base"])
    src["train"].pop("max_tokens")
    src["budget"] = {"flops": 6e12, "gpu": "h100"}
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(yaml.safe_dump(src))
    plan, _ = run_plan(cfg)
    n = 43_904  # GPT-2, n_embd 32, 2 layers, vocab 512, 64 positions, tied head: counted by hand below
    assert n == 512 * 32 + 64 * 32 + 2 * (2 * 2 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 32 * 128 + 128 + 128 * 32 + 32) \
        + 2 * 32
    assert plan["params"] == n and plan["run"]["params"] == n
    assert plan["tokens"] == pytest.approx(6e12 / (6 * n)) and plan["run"]["tokens"] == plan["tokens"]
    assert plan["continued"]["architecture"] == "GPT2LMHeadModel" and plan["alternatives"] == []
    assert plan["model"]["d_model"] == 32 and plan["model"]["n_layers"] == 2 and plan["model"]["vocab_size"] == 512
    out = io.StringIO()
    print_plan(plan, Console(file=out, width=300))
    assert "minus nothing" in out.getvalue() and "GPT2LMHeadModel" in out.getvalue()
    # a time budget: hours × the GPU's assumed FLOP/s ÷ the base's FLOPs per token
    src["budget"] = {"gpu": "h100", "gpus": 1, "hours": 0.001, "mfu": 0.4}
    cfg.write_text(yaml.safe_dump(src))
    plan, _ = run_plan(cfg)
    assert plan["tokens"] == pytest.approx(3.6 * plan["compute"]["hardware_flops_per_s"] / plan["flops_per_token"])
    assert plan["compute_flops"] == pytest.approx(6 * n * plan["tokens"])
    # a CPU budget: the base's own speed on this machine (measured once; here read back from the plan it wrote)
    from transformers import AutoModelForCausalLM

    from domainlm.model.base import resolve_base
    from domainlm.plan.hardware import measure_shape_throughput
    from domainlm.plan.planner import machine_id

    base = resolve_base(prepared["base"])
    probe = measure_shape_throughput(base.shape, 32, 4, seconds=0.0,
                                     model=AutoModelForCausalLM.from_pretrained(prepared["base"]))
    assert probe["steps"] == 3 and probe["tokens_per_s"] > 0  # the GPT-2 itself trains in the probe
    fp = plan["continued"]["fingerprint"]
    assert fp == base.fingerprint
    earlier = tmp_path / "planrun" / "plan.json"  # the last plan, as if made on a CPU budget with this probe
    earlier.write_text(json.dumps({**json.loads(earlier.read_text()), "compute": {
        "method": "cpu-probe", "machine": machine_id(), "measured_flops_per_s": 1e9,
        "shape_probe": {"machine": machine_id(), "base": fp, "seq_len": 32, "micro_batch": 4,
                        "tokens_per_s": 5000.0}}}))
    src["budget"] = {"gpu": "cpu", "hours": 0.001}
    cfg.write_text(yaml.safe_dump(src))
    plan, _ = run_plan(cfg)
    assert plan["tokens"] == pytest.approx(3.6 * 5000.0) and plan["run"]["tokens_per_s"] == pytest.approx(5000.0)
    assert plan["compute_flops"] == pytest.approx(6 * n * 3.6 * 5000.0)
    # memory from the real shape
    code, out, err = cli("memory", "--model", str(prepared["base"]), "--json", "--seq-len", "32", "--micro-batch", "4")
    assert code == 0, err
    mem = json.loads(out)
    assert mem["params"] == n and mem["weights_gb"] == pytest.approx(2 * n / 1e9)


def _with(prepared, tmp_path: Path, **train) -> Path:
    src = yaml.safe_load(prepared["cfg"].read_text())
    src["run_dir"] = str(prepared["run"])
    src["train"].update({"init_from": str(prepared["base"]), **train})
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(src))
    return cfg


def test_bad_bases_are_one_line(prepared, tmp_path, cli):
    base = prepared["base"]
    (tmp_path / "empty").mkdir()
    shutil.copytree(base, tmp_path / "notok", ignore=shutil.ignore_patterns("tokenizer.json"))
    shutil.copytree(base, tmp_path / "noweights", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(base, tmp_path / "weird")
    conf = json.loads((base / "config.json").read_text())
    (tmp_path / "weird" / "config.json").write_text(json.dumps({**conf, "model_type": "no-such-model"}))
    cases = [(tmp_path / "missing", "no such model folder or run directory"),
             (tmp_path / "empty", "neither a Hugging Face model folder"),
             (tmp_path / "notok", "no tokenizer.json"), (tmp_path / "noweights", "no weights"),
             (tmp_path / "weird", "transformers cannot read its config.json")]
    for folder, why in cases:
        code, _, err = cli("train", str(_with(prepared, tmp_path, init_from=str(folder))))
        assert code == 2, err
        assert err.startswith(f"error: train.init_from: {folder}: ") and why in err, err
        assert len(err.strip().splitlines()) == 1, err
    code, _, err = cli("train", str(_with(prepared, tmp_path, seq_len=128, tokens_per_step=512)))
    assert code == 2 and "train.seq_len: 128 is longer than the base model's context 64" in err
    with pytest.raises(UserError, match="train.init_from: .*: no such model folder or run directory"):
        from domainlm.model.base import resolve_base

        resolve_base(tmp_path / "missing")


def test_decoder_layers_of_any_architecture(prepared):
    """FSDP wrapping, compile and activation checkpointing find GPT-2's blocks (transformer.h) like Llama's
    (model.layers); checkpointing GPT-2's dropout layers replays their RNG, so the gradients are the same."""
    from transformers import AutoModelForCausalLM

    from domainlm.model import build_model
    from domainlm.shape import make_shape
    from domainlm.train.parallel import Dist, decoder_layers, parallelize

    gpt2 = AutoModelForCausalLM.from_pretrained(prepared["base"])
    assert decoder_layers(gpt2) is gpt2.transformer.h
    llama = build_model(make_shape(32, 2, 300), 32)
    assert decoder_layers(llama) is llama.model.layers
    batch = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        m = AutoModelForCausalLM.from_pretrained(prepared["base"]).train()
        m = parallelize(m, "none", Dist(0, 1, 0, torch.device("cpu")), activation_checkpointing=ckpt)
        torch.manual_seed(1)
        m(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])  # same order; the wrapper renames them
    assert len(decoder_layers(m)) == 2 and len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
