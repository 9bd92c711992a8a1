"""The model: LlamaForCausalLM from a shape (GQA, tied embeddings), shape resolution, HF export round trip."""

from __future__ import annotations

import json

import pytest
import torch

from domainlm.config import validate
from domainlm.errors import UserError
from domainlm.model import build_model, export_hf, resolve_shape
from domainlm.plan.planner import PlanRequest, make_plan
from domainlm.shape import ModelShape
from test_train_fixtures import make_tokenizer


def test_build_matches_shape_and_is_seeded():
    shape = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=300)
    m = build_model(shape, 32, seed=1)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == shape.params_total
    assert m.config.num_key_value_heads == 2 and m.config._attn_implementation == "sdpa"
    m2 = build_model(shape, 32, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters(), strict=True))


def test_tied_export_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = ModelShape(2, 32, 4, 4, 96, 300, tie_embeddings=True)
    m = build_model(shape, 64, seed=0, eos_id=1)
    assert sum(p.numel() for p in m.parameters()) == shape.params_total  # the head is the embedding
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(3.0)  # "trained": differs from a fresh init
    tok_dir = make_tokenizer(tmp_path / "tokenizer")
    (tok_dir / "audit.json").write_text("{}")
    out = export_hf(m.state_dict(), m.config, tok_dir, tmp_path / "model")
    assert not (out / "audit.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)("notwithstanding the licensee", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (hf(ids).logits - m(ids).logits).abs().max().item() < 1e-5
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_resolve_shape_from_plan_or_config(tmp_path):
    cfg = validate({"name": "x", "model": {"n_kv_heads": 1}})
    with pytest.raises(UserError, match="no plan; run `domainlm plan CONFIG`"):
        resolve_shape(cfg, tmp_path, 512)
    plan = make_plan(PlanRequest(flops=3e15, vocab_size=512, seq_len=256))  # every field `domainlm plan` writes
    plan["model"].update(n_layers=3, d_model=64, n_heads=2, n_kv_heads=2, ffn_dim=192)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    s = resolve_shape(cfg, tmp_path, 512)
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.ffn_dim, s.vocab_size) == (3, 64, 2, 1, 192, 512)
    fixed = validate({"name": "x", "model": {"d_model": 96, "n_layers": 1}})
    s = resolve_shape(fixed, tmp_path, 512)
    assert (s.d_model, s.n_heads, s.ffn_dim) == (96, 3, 256)  # heads/ffn by the shape rule, not the plan's
    with pytest.raises(UserError, match="model.n_kv_heads"):  # both in the config: found at load
        validate({"name": "x", "model": {"d_model": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 3}})
    with pytest.raises(UserError, match="model.n_kv_heads"):  # n_heads from the plan: found when resolved
        resolve_shape(validate({"name": "x", "model": {"n_kv_heads": 3}}), tmp_path, 512)
