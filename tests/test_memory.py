"""Memory model: ZeRO Figure 1 and the course rule of thumb (ANCHORS.md)."""

import json

import pytest

from domainlm import memory as M


@pytest.mark.parametrize("sharding,expected", [("ddp", 120.0), ("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.9)])
def test_zero_figure1(sharding, expected):
    e = M.estimate(7.5e9, precision="bf16-mixed", optimizer="adamw", sharding=sharding, gpus=64)
    assert e.weights_gb + e.grads_gb + e.optimizer_gb == pytest.approx(expected, abs=0.1)


def test_course_rule_1b_fp32_adam():
    e = M.estimate(1e9, precision="fp32", optimizer="adamw")
    assert e.weights_gb == pytest.approx(4.0)
    assert e.grads_gb == pytest.approx(4.0)
    assert e.optimizer_gb == pytest.approx(8.0)
    assert e.activations_gb == pytest.approx(8.0)  # the rule's ~8 B/param of activations and temporaries
    assert e.total_gb == pytest.approx(24.0)
    assert "rule of thumb" in e.activations_method


def test_precisions_and_optimizers():
    bf16 = M.estimate(1e9, precision="bf16", optimizer="adamw")
    assert bf16.weights_gb == pytest.approx(2.0) and bf16.optimizer_gb == pytest.approx(4.0)
    sgd = M.estimate(1e9, precision="bf16-mixed", optimizer="sgd")
    assert sgd.optimizer_gb == pytest.approx(8.0)  # fp32 master + momentum
    ada = M.estimate(1e9, precision="fp32", optimizer="adafactor")
    assert 0 < ada.optimizer_gb < 0.05  # factored second moments: rows + cols per matrix


def test_activations_korthikanti():
    # Korthikanti et al.'s count applied to the Llama layer (memory.py), by hand for h = 2048 (16 heads of
    # 128, kv = h), ffn 5504 (the shape rule), bf16 (w = 2), per token and layer:
    #   norms 2·(4h + 4 + 2·2h) = 16h + 8, attention 2·(2h + 2h) + 4·16 = 8h + 64, MLP 4·2·5504 = 44,032
    #   → 24·2048 + 8 + 64 + 44,032 = 93,256 B; final norm 4h + 4 + 4h = 16,388 B; logits 3·4·V = 384,000 B.
    tokens = 2048 * 4
    e = M.estimate(1e9, precision="bf16-mixed", seq_len=2048, micro_batch=4, n_layers=24, d_model=2048,
                   vocab_size=32000)
    expect = 24 * 93_256 * tokens + 16_388 * tokens + 3 * 4 * tokens * 32000
    assert e.activations_gb == pytest.approx(expect / 1e9)
    ckpt = M.estimate(1e9, precision="bf16-mixed", seq_len=2048, micro_batch=4, n_layers=24, d_model=2048,
                      vocab_size=32000, activation_checkpointing=True)
    # checkpointing keeps each layer's input (2·h bytes per token); the peak then adds the larger of the logits
    # term (384,000 B per token, at the start of backward) and one recomputed layer (93,256 B).
    assert ckpt.activations_gb == pytest.approx((24 * 2 * 2048 * tokens + 384_000 * tokens + 16_388 * tokens) / 1e9)
    # fp32 (w = 4): norms 2·(4h + 4 + 8h) = 24h + 8, attention 4·4h + 64 = 16h + 64, MLP 16·5504 = 88,064.
    fp32 = M.estimate(1e9, precision="fp32", seq_len=2048, micro_batch=4, n_layers=24, d_model=2048, vocab_size=32000)
    per_layer = 40 * 2048 + 8 + 64 + 88_064
    assert fp32.activations_gb == pytest.approx(
        (24 * per_layer * tokens + (12 * 2048 + 4) * tokens + 3 * 4 * tokens * 32000) / 1e9)
    # Grouped-query attention stores k and v at n_kv_heads width: 4 kv heads of 128 save 2·2·2·(2048 − 512) B less.
    gqa = M.estimate(1e9, precision="bf16-mixed", seq_len=2048, micro_batch=4, n_layers=24, d_model=2048,
                     vocab_size=32000, n_heads=16, n_kv_heads=4)
    assert (e.activations_gb - gqa.activations_gb) * 1e9 == pytest.approx(24 * tokens * 2 * 2 * (2048 - 512))


def test_recommend_least_sharding_that_fits():
    rec, ests = M.recommend(40, params=7.5e9, gpus=64, seq_len=2048, micro_batch=1, n_layers=32, d_model=4096)
    # ddp: 120 GB of states; zero1: 31.4 + 12.2 GB activations (32 layers × 186,504 B × 2048 tokens) > 40.
    assert rec == "zero2"
    assert ests["ddp"].total_gb > ests["zero1"].total_gb > 40 >= ests["zero2"].total_gb
    rec, _ = M.recommend(1, params=7.5e9, gpus=8, seq_len=2048, micro_batch=1, n_layers=32, d_model=4096)
    assert rec is None


def test_memory_cli_json(cli):
    code, out, _ = cli("memory", "--params", "7.5B", "--gpus", "64", "--sharding", "zero2", "--json")
    assert code == 0
    r = json.loads(out)
    for k in ("weights_gb", "grads_gb", "optimizer_gb", "activations_gb", "total_gb", "fits", "recommended_sharding"):
        assert k in r
    assert r["weights_gb"] + r["grads_gb"] + r["optimizer_gb"] == pytest.approx(16.6, abs=0.1)
    code, out, _ = cli("memory", "--params", "7.5e9", "--gpus", "64", "--gpu-memory-gb", "40", "--seq-len", "2048",
                       "--micro-batch", "1", "--json")
    r = json.loads(out)
    assert r["recommended_sharding"] == r["sharding"] and r["fits"] is True


def test_memory_cli_table(cli):
    code, out, _ = cli("memory", "--params", "1e9", "--precision", "fp32", "--gpu", "a100-40gb")
    assert code == 0
    assert "24.00" in out and "recommended" in out


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--params", "0"], "--params"),
        (["--params", "1e"], "--params"),
        (["--params", "1e9", "--precision", "fp8"], "--precision"),
        (["--params", "1e9", "--optimizer", "lion"], "--optimizer"),
        (["--params", "1e9", "--sharding", "zero4"], "--sharding"),
        (["--params", "1e9", "--seq-len", "2048"], "--micro-batch"),
        (["--params", "1e9", "--gpu", "v100"], "--gpu"),
    ],
)
def test_memory_bad_input(cli, args, flag):
    code, _, err = cli("memory", *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and flag in err
