"""The planner reproduces published numbers (ANCHORS.md) and handles data limits and bad input."""

import json
import math

import pytest

from domainlm.plan import laws as L
from domainlm.plan.planner import PlanRequest, make_plan
from domainlm.shape import ModelShape, shape_for_params


@pytest.mark.parametrize("params,flops,tokens", L.CHINCHILLA_TABLE3)
def test_chinchilla_table3_approach1_within_5pct(params, flops, tokens):
    n, d = L.LAWS["chinchilla-1"].optimal(flops)
    assert n == pytest.approx(params, rel=0.05)
    assert d == pytest.approx(tokens, rel=0.05)


def test_chinchilla1_constants_are_the_minimax_fit_of_table3():
    from scipy.optimize import minimize

    def worst(p):
        a, lg = p
        errs = []
        for n, c, d in L.CHINCHILLA_TABLE3:
            nf = math.exp(lg) * c**a
            errs += [abs(math.log(nf / n)), abs(math.log(c / (6 * nf) / d))]
        return max(errs)

    res = minimize(worst, [0.5, math.log(0.09)], method="Nelder-Mead", options=dict(xatol=1e-10, fatol=1e-12))
    assert res.x[0] == pytest.approx(L.CHINCHILLA_1_A, abs=1e-4)
    assert math.exp(res.x[1]) == pytest.approx(L.CHINCHILLA_1_G, rel=1e-3)
    assert worst([L.CHINCHILLA_1_A, math.log(L.CHINCHILLA_1_G)]) < math.log(1.035)


def test_exponents_match_the_papers():
    # Chinchilla: approach 1 a=0.50, approach 2 a=0.49, approach 3 a=0.46; Kaplan 0.73.
    assert L.LAWS["chinchilla-1"].a == pytest.approx(0.50, abs=0.005)
    assert L.LAWS["chinchilla-2"].a == pytest.approx(0.49, abs=1e-9)
    assert L.LAWS["chinchilla-3"].a == pytest.approx(0.46, abs=0.01)
    assert L.LAWS["kaplan"].a == pytest.approx(0.73)
    assert L.LAWS["kaplan"].b == pytest.approx(0.27)
    for law in L.LAWS.values():
        n, d = law.optimal(1e22)
        assert 6 * n * d == pytest.approx(1e22)


def test_parametric_optimum_is_the_minimum_of_the_loss():
    law = L.LAWS["chinchilla-3"]
    c = 1e21
    n_opt, d_opt = law.optimal(c)
    best = law.loss(n_opt, d_opt)
    for f in (0.5, 0.8, 1.25, 2.0):
        n = n_opt * f
        assert law.loss(n, c / (6 * n)) > best
    assert best == pytest.approx(1.69 + 406.4 / n_opt**0.34 + 410.7 / d_opt**0.28)


def test_epoch_2024_compute_optimal_allocation_by_hand():
    # Besiroglu et al. 2024 (arXiv 2404.10102): E=1.8172, A=482.01, B=2085.43, α=0.3478, β=0.3658.
    # By hand (Chinchilla eq. 4): a = β/(α+β) = 0.3658/0.7136 = 0.512612; αA = 167.643, βB = 762.850,
    # G = (αA/βB)^(1/(α+β)) = 0.219759^1.401345 = exp(−1.515222 × 1.401345) = 0.119630.
    # At Gopher's budget C = 5.76e23: C/6 = 9.6e22, ln = 52.918635, × a = 27.126733, exp = 6.03935e11;
    # N_opt = 0.119630 × 6.03935e11 = 7.2249e10 (72.2B: the 72.2B of issue 22, against approach 1's 66.0B,
    # approach 2's 63.0B and the published approach 3's 32.2B), D_opt = C/(6·N) = 1.3287e12 (18.4 tokens/param).
    law = L.LAWS["epoch-2024"]
    assert law.a == pytest.approx(0.512612, abs=1e-6)
    n, d = law.optimal(5.76e23)
    assert n == pytest.approx(7.2249e10, rel=1e-4) and d == pytest.approx(1.3287e12, rel=1e-4)
    assert L.LAWS["chinchilla-1"].optimal_params(5.76e23) == pytest.approx(66.0e9, rel=0.005)
    assert L.LAWS["chinchilla-2"].optimal_params(5.76e23) == pytest.approx(63.0e9, rel=1e-6)
    assert L.LAWS["chinchilla-3"].optimal_params(5.76e23) == pytest.approx(32.2e9, rel=0.005)
    # The plan defaults to it, in the planner and in a config.
    from domainlm.config import BudgetConfig

    assert PlanRequest().law == BudgetConfig().law == "epoch-2024"
    assert make_plan(PlanRequest(flops=5.76e23))["params"] == pytest.approx(7.2249e10, rel=1e-4)


def test_kaplan_counts_non_embedding_params():
    p = make_plan(PlanRequest(flops=1e21, law="kaplan", vocab_size=32768))
    assert p["law"]["params_counted"] == "non-embedding"
    assert p["model"]["params_non_embedding"] == pytest.approx(p["params"], rel=0.05)
    p3 = make_plan(PlanRequest(flops=1e21, law="chinchilla-3"))
    assert p3["law"]["params_counted"] == "total"
    assert p3["model"]["params_total"] == pytest.approx(p3["params"], rel=0.05)


def test_muennighoff_effective_tokens_by_hand():
    # No repetition: effective = tokens.
    assert L.effective_tokens(100.0, 80.0) == 80.0
    assert L.effective_tokens(100.0, 100.0) == 100.0
    # 4 epochs of U=100: R=3 → D' = 100 + 100·15.387756·(1 − e^(−3/15.387756)) = 100 + 272.567 = 372.567
    # (by hand: 3/15.387756 = 0.194960, e^-0.194960 = 0.822867).
    r_star = 15.387756
    assert L.effective_tokens(100.0, 400.0) == pytest.approx(100 + 100 * r_star * (1 - math.exp(-3 / r_star)))
    assert L.effective_tokens(100.0, 400.0) == pytest.approx(372.567, abs=0.01)
    # Many epochs saturate at U·(1 + R*).
    assert L.effective_tokens(1.0, 1e6) == pytest.approx(1 + r_star, rel=1e-6)


def test_epochs_per_source_from_weights_and_tokens():
    p = make_plan(
        PlanRequest(
            flops=1e21,
            weights={"legal": 0.51, "news": 0.49},
            unique_tokens={"legal": 2e9, "news": 50e9},
            roles={"legal": "domain", "news": "general"},
        )
    )
    d = p["tokens"]
    legal = p["sources"]["legal"]
    assert legal["tokens"] == pytest.approx(0.51 * d)
    assert legal["epochs"] == pytest.approx(0.51 * d / 2e9)
    assert p["sources"]["news"]["epochs"] == pytest.approx(0.49 * d / 50e9)
    assert legal["effective_tokens"] == pytest.approx(L.effective_tokens(2e9, 0.51 * d))
    assert p["effective_tokens"] == pytest.approx(sum(s["effective_tokens"] for s in p["sources"].values()))
    assert legal["epochs"] > 4
    assert any("'legal'" in w and "epochs" in w for w in p["warnings"])
    names = [a["name"] for a in p["alternatives"]]
    assert {"bloomberggpt", "lower-domain-weight", "data-constrained-optimum"} <= set(names)
    low = next(a for a in p["alternatives"] if a["name"] == "lower-domain-weight")
    assert low["sources"]["legal"]["epochs"] == pytest.approx(4.0)
    assert sum(low["weights"].values()) == pytest.approx(1.0)
    bbg = next(a for a in p["alternatives"] if a["name"] == "bloomberggpt")
    assert max(s["epochs"] for s in bbg["sources"].values()) == pytest.approx(1.0)
    assert bbg["compute_flops"] == pytest.approx(0.7e21)
    dc = next(a for a in p["alternatives"] if a["name"] == "data-constrained-optimum")
    # Muennighoff: parameters the unique data cannot use decay faster (R*_N = 5.3) than repeated tokens
    # (R*_D = 15.4), so the optimum moves to fewer parameters and more epochs.
    assert dc["params"] < p["params"]
    assert dc["sources"]["legal"]["epochs"] > legal["epochs"]
    assert dc["data_constrained"]["loss"] <= p["data_constrained"]["loss"]


def test_bloomberggpt_budget_gives_a_model_of_its_size():
    # 1.3M A100-40GB hours × 0.75 (the share BloombergGPT planned with, paying for recomputation), MFU 33%,
    # FinPile 363B + public 345B unique tokens: the paper's choice was 50.6B params on 569B tokens.
    p = make_plan(
        PlanRequest(
            gpu="a100-40gb",
            gpus=512,
            hours=1.3e6 * 0.75 / 512,
            mfu=0.33,
            law="chinchilla-1",
            weights={"finpile": 0.5127, "public": 0.4873},
            unique_tokens={"finpile": 363e9, "public": 345e9},
            roles={"finpile": "domain", "public": "general"},
        )
    )
    bbg = next(a for a in p["alternatives"] if a["name"] == "bloomberggpt")
    assert 40e9 < bbg["params"] < 70e9
    assert bbg["outside_range"] is False and "warning" not in bbg  # the paper's own choice is inside its range
    # U_N for the 708B unique tokens, with epoch-2024's L(N, D) standing in for chinchilla-1 (docs/planning.md).
    assert bbg["data_constrained"]["loss_law"] == "epoch-2024"
    assert bbg["data_constrained"]["unique_params"] == pytest.approx(37.3e9, rel=0.005)
    assert bbg["tokens"] == pytest.approx(708e9, rel=0.01)
    assert p["memory"]["recommended_sharding"] == "zero3"


@pytest.mark.parametrize(
    "params,vocab",
    [(p, 32768) for p in (2e7, 1.25e8, 3.5e8, 1e9, 7e9, 50.6e9, 1e12)]
    + [(p, 131072) for p in (1.25e8, 1e9, 50.6e9)]
    + [(p, 8192) for p in (5e6, 2e7)],
)
def test_shape_within_5pct(params, vocab):
    s = shape_for_params(params, vocab)
    assert s.params_total == pytest.approx(params, rel=0.05)
    assert s.d_model % s.n_heads == 0 and s.ffn_dim % 64 == 0
    assert 16 <= s.d_model / s.n_layers <= 256


def test_shape_param_count_matches_transformers_llama():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    s = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=300)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == s.params_total


def test_flops_per_token_is_6n_plus_attention():
    s = ModelShape(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, ffn_dim=704, vocab_size=8192)
    n_matmul = s.params_non_embedding + 8192 * 256
    assert s.flops_per_token(512) == 6 * n_matmul + 12 * 4 * 256 * 512


def test_gpu_hours_round_trip():
    # 8 GPUs × 24 h = 192 GPU-hours: the tokens are sized with the same FLOPs per token the hours are counted in.
    p = make_plan(PlanRequest(gpu="h100", gpus=8, hours=24))
    assert p["gpu_hours"] == pytest.approx(192.0, rel=1e-9)
    hardware = 989e12 * 0.40 * 8 * 24 * 3600
    assert p["tokens"] * p["flops_per_token"] == pytest.approx(hardware, rel=1e-9)
    assert p["compute"]["hardware_flops"] == pytest.approx(hardware, rel=1e-9)
    # ...and the law's budget C = 6·N·D is the one whose optimum is the planned N (the default law: epoch-2024).
    law = L.LAWS[L.DEFAULT_LAW]
    assert p["compute_flops"] == pytest.approx(6 * p["params"] * p["tokens"], rel=1e-9)
    assert law.optimal_params(p["compute_flops"]) == pytest.approx(p["params"], rel=1e-9)


def _fake_shape_probe(monkeypatch, efficiency: float, calls: list):
    """The planned shape's own speed: ``efficiency`` × the generic probe's FLOP/s (measured here: ~0.45)."""
    from domainlm.plan import hardware

    def probe(shape, seq_len, micro_batch, seconds=4.0):
        calls.append((shape.d_model, shape.n_layers))
        flops = 5e10 * efficiency
        return {"tokens_per_s": flops / shape.flops_per_token(seq_len), "flops_per_s": flops}

    monkeypatch.setattr(hardware, "measure_shape_throughput", probe)


def test_cpu_budget_is_sized_at_the_planned_shapes_measured_speed(monkeypatch):
    calls = []
    _fake_shape_probe(monkeypatch, 0.45, calls)
    p = make_plan(PlanRequest(gpu="cpu", hours=0.5, cpu_flops_per_s=5e10, vocab_size=8192, seq_len=256))
    assert p["compute"]["method"] == "cpu-probe" and calls
    m = p["model"]
    assert calls[-1] == (m["d_model"], m["n_layers"])  # the speed of the shape that trains
    # 1800 s at the planned shape's measured speed, not the generic probe's 5e10 FLOP/s.
    assert p["tokens"] * p["flops_per_token"] == pytest.approx(0.45 * 5e10 * 1800, rel=1e-9)
    assert p["gpu_hours"] == pytest.approx(0.5, rel=1e-9)
    assert p["run"]["follows_plan"] and p["run"]["planned_seconds"] == pytest.approx(1800, rel=1e-9)
    assert p["run"]["tokens"] == p["tokens"]


def test_cpu_probe_times_the_trainers_model_and_step(monkeypatch):
    """The CPU speed probe trains the real model (`build_model`: a Llama of the probe's shape) with the real
    `train_step`, and turns its tokens/s into FLOP/s with that shape's FLOPs per token."""
    from domainlm.plan import hardware
    from domainlm.train.step import train_step
    from test_train_fixtures import single_thread

    built, steps, real_build = [], [], hardware.build_model

    def build(shape, max_positions, **kw):
        built.append(real_build(shape, max_positions, **kw))
        return built[-1]

    def step(model, *args, **kw):
        steps.append(train_step(model, *args, **kw))
        assert model is built[0]
        return steps[-1]

    monkeypatch.setattr(hardware, "build_model", build)
    monkeypatch.setattr(hardware, "train_step", step)
    with single_thread():  # a loaded 2-core machine runs it several times faster on one thread
        r = hardware.measure_cpu_flops(seconds=0.0, seq_len=16, batch=2)
    assert set(r) == {"flops_per_s", "tokens_per_s", "probe", "threads"}
    assert type(built[0]).__name__ == "LlamaForCausalLM" and len(built) == 1
    shape = hardware.make_shape(256, 4, 8192)
    assert sum(p.numel() for p in built[0].parameters()) == shape.params_total  # 7.4M, untied head
    assert len(steps) == 3 and r["probe"].endswith("batch 2x16, fp32, 2 steps")  # one warm-up, two timed
    assert all(s.tokens == 2 * 16 and not s.skipped for s in steps)
    assert steps[0].loss > steps[1].loss > steps[2].loss  # AdamW steps the model: the same batch gets easier
    assert r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * shape.flops_per_token(16), rel=1e-12)


def test_a_fixed_shape_and_budget_are_shown_as_overrides(monkeypatch):
    calls = []
    _fake_shape_probe(monkeypatch, 0.45, calls)
    req = PlanRequest(gpu="cpu", hours=0.05, cpu_flops_per_s=5e10, vocab_size=8192, seq_len=256,
                      fixed_model={"d_model": 128, "n_layers": 4})
    p = make_plan(req)
    run = p["run"]
    assert calls == [(128, 4)] and not run["follows_plan"]
    assert run["model"]["d_model"] == 128 and run["model"]["n_layers"] == 4
    assert (p["model"]["d_model"], p["model"]["n_layers"]) != (128, 4)  # the law's plan is still shown
    fpt = ModelShape(4, 128, 4, 4, 384, 8192).flops_per_token(256)
    assert run["tokens"] == pytest.approx(180 * 0.45 * 5e10 / fpt, rel=1e-9)  # the hours, on the fixed shape
    assert [o["what"] for o in run["overrides"]] == ["model", "tokens"]
    assert "embeddings" in run["overrides"][0]["reason"]
    assert any("does not follow the plan's model" in w for w in p["warnings"])
    # A fixed token budget that does not fit the hours says so.
    req.fixed_tokens = 2 * run["tokens"]
    p = make_plan(req)
    assert p["run"]["tokens"] == req.fixed_tokens and p["run"]["planned_seconds"] == pytest.approx(360, rel=1e-6)
    assert "train.max_tokens" in p["run"]["overrides"][-1]["reason"]
    assert any("not the budget's 180 s" in w for w in p["warnings"])


# ---------------------------------------------------------------------------------------------------- data limits


def test_params_for_tokens_inverts_the_optimum():
    for law in L.LAWS.values():
        n, d = law.optimal(3e21)
        assert law.params_for_tokens(d) == pytest.approx(n, rel=1e-9)


def test_muennighoff_effective_params_by_hand():
    assert L.effective_params(100.0, 80.0) == 80.0
    # N = 4·U_N: R_N = 3 → N' = 100 + 100·5.309743·(1 − e^(−3/5.309743)) = 100 + 5.309743·43.16… = 229.2
    # (by hand: 3/5.309743 = 0.565000, e^-0.565 = 0.568361).
    assert L.effective_params(100.0, 400.0) == pytest.approx(100 + 530.9743 * (1 - 0.568361), abs=0.01)
    assert L.effective_params(1.0, 1e9) == pytest.approx(1 + 5.309743, rel=1e-6)


@pytest.mark.parametrize("flops,unique,params,tokens", [(1e22, 5e9, 4.5e9, 373e9), (1e23, 20e9, 12.6e9, None)])
def test_data_constrained_optimum_matches_the_hand_computation(flops, unique, params, tokens):
    # ANCHORS.md: Chinchilla approach-3 constants with Muennighoff's D' and N' (U_N = the compute-optimal size for
    # the unique tokens), hand-computed: 1e22 FLOPs on 5B unique tokens → ≈ 4.5B params on ≈ 373B tokens (≈ 75
    # epochs); 1e23 on 20B → ≈ 12.6B. Ignoring N' gave 14.8B and 39B.
    p = make_plan(PlanRequest(flops=flops, law="chinchilla-3", weights={"d": 1.0}, unique_tokens={"d": unique}))
    dc = next(a for a in p["alternatives"] if a["name"] == "data-constrained-optimum")
    assert dc["params"] == pytest.approx(params, rel=0.10)
    if tokens:
        assert dc["tokens"] == pytest.approx(tokens, rel=0.10)
        assert dc["data_constrained"]["epochs"] == pytest.approx(75, rel=0.10)
    c3 = L.LAWS["chinchilla-3"]
    info = dc["data_constrained"]
    u_n = c3.params_for_tokens(unique)
    assert info["unique_tokens"] == pytest.approx(unique)
    assert info["unique_params"] == pytest.approx(u_n)
    assert info["effective_params"] == pytest.approx(L.effective_params(u_n, dc["params"]))
    assert info["effective_tokens"] == pytest.approx(L.effective_tokens(unique, dc["tokens"]))
    assert info["loss"] == pytest.approx(c3.loss(info["effective_params"], info["effective_tokens"]))
    assert info["loss_law"] == dc["loss_law"] == "chinchilla-3"
    # It is the minimum of L(N', D') along the iso-FLOP line.
    for f in (0.8, 1.25):
        n = dc["params"] * f
        d = flops / (6 * n)
        worse = c3.loss(L.effective_params(u_n, n), L.effective_tokens(unique, d))
        assert worse > info["loss"]


def test_fewer_unique_tokens_fewer_params_more_epochs():
    # Muennighoff et al. 2023 §6: with less unique data the optimum spends compute on epochs, not parameters.
    n_opt = L.LAWS["chinchilla-3"].optimal_params(1e22)
    found = []
    for unique in (160e9, 80e9, 40e9, 20e9):
        p = make_plan(PlanRequest(flops=1e22, law="chinchilla-3", weights={"d": 1.0}, unique_tokens={"d": unique}))
        dc = next(a for a in p["alternatives"] if a["name"] == "data-constrained-optimum")
        found.append((dc["params"], dc["data_constrained"]["epochs"]))
    params, epochs = zip(*found, strict=True)
    assert n_opt > params[0] and list(params) == sorted(params, reverse=True)
    assert list(epochs) == sorted(epochs)


def test_data_constrained_cli_states_the_law_and_its_numbers(cli):
    code, out, err = cli("plan", "--flops", "1e22", "--unique-tokens", "d=5e9", "--weight", "d=1", "--law",
                         "chinchilla-3", "--json")
    assert code == 0, err
    p = json.loads(out)
    dc = next(a for a in p["alternatives"] if a["name"] == "data-constrained-optimum")
    assert 3.5e9 <= dc["params"] <= 5.6e9
    for k in ("unique_tokens", "unique_params", "effective_params", "effective_tokens", "epochs", "loss_law"):
        assert k in dc["data_constrained"]
    assert "U_N" in dc["description"] and "chinchilla-3" in dc["description"]


@pytest.mark.parametrize("law,loss_law", [("chinchilla-1", "epoch-2024"), ("chinchilla-2", "epoch-2024"),
                                          ("chinchilla-3", "chinchilla-3"), ("epoch-2024", "epoch-2024"),
                                          ("kaplan", "kaplan")])
def test_data_constrained_says_which_loss_it_used(law, loss_law):
    p = make_plan(PlanRequest(flops=1e22, law=law, weights={"d": 1.0}, unique_tokens={"d": 5e9}))
    dc = next(a for a in p["alternatives"] if a["name"] == "data-constrained-optimum")
    assert dc["loss_law"] == p["data_constrained"]["loss_law"] == loss_law
    shift = [n for n in p["notes"] if "alone moves" in n]
    if loss_law != law:
        assert f"{law} has no loss formula" in dc["description"]
        assert any(f"{law} has no loss formula" in n for n in p["notes"])
        # One line says how much the stand-in alone moves the answer: its unconstrained optimum against the law's.
        from domainlm.units import human

        own, other = L.LAWS[law].optimal_params(1e22), L.LAWS[loss_law].optimal_params(1e22)
        assert len(shift) == 1 and human(own) in shift[0] and human(other) in shift[0]
        assert f"{other / own - 1:+.1%}" in shift[0]
    else:
        assert not shift
    assert dc["params"] < p["params"]


def test_bloomberggpt_outside_its_range_is_flagged():
    p = make_plan(PlanRequest(flops=1e22, weights={"d": 1.0}, unique_tokens={"d": 5e9}))
    bbg = next(a for a in p["alternatives"] if a["name"] == "bloomberggpt")
    assert bbg["tokens_per_param"] < 0.05 and bbg["outside_range"] is True
    assert "outside the range" in bbg["warning"] and bbg["warning"] in p["warnings"]


def test_kaplan_beyond_the_shape_cap_says_so():
    p = make_plan(PlanRequest(flops=3e25, law="kaplan"))
    shape_warnings = [w for w in p["warnings"] if w.startswith("model shape")]
    assert len(shape_warnings) == 1
    assert "cap" in shape_warnings[0] and "256 layers" in shape_warnings[0] and "vocab" not in shape_warnings[0]


def test_json_keys(cli):
    code, out, _ = cli("plan", "--flops", "1e21", "--json")
    assert code == 0
    p = json.loads(out)
    for k in ("compute_flops", "law", "params", "tokens", "tokens_per_param", "predicted_loss", "model", "sources",
              "effective_tokens", "gpu_hours", "warnings", "alternatives"):
        assert k in p
    for k in ("n_layers", "d_model", "n_heads", "ffn_dim", "vocab_size", "params_non_embedding", "params_total"):
        assert k in p["model"]
    assert p["law"]["name"] == "epoch-2024"  # the default law
    assert p["predicted_loss"] == pytest.approx(L.LAWS["epoch-2024"].loss(p["params"], p["tokens"]))


def test_plot(tmp_path, cli):
    out = tmp_path / "plan.png"
    code, _, _ = cli("plan", "--flops", "1e21", "--plot", str(out))
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--flops", "-1e20"], "--flops"),
        (["--flops", "0"], "--flops"),
        (["--flops", "1e"], "--flops"),
        (["--gpu", "h100", "--hours", "10", "--mfu", "1.5"], "--mfu"),
        (["--gpu", "h100", "--hours", "10", "--mfu", "0"], "--mfu"),
        (["--gpu", "tpu-v9", "--hours", "10"], "--gpu"),
        (["--flops", "1e20", "--weight", "a=0.5", "--weight", "b=0.4"], "--weight"),
        (["--flops", "1e20", "--weight", "a=0.5", "--weight", "b=0.5", "--unique-tokens", "a=1e9"], "--unique-tokens"),
        (["--flops", "1e20", "--unique-tokens", "a=1e"], "--unique-tokens"),
        (["--flops", "1e20", "--law", "chinchilla-9"], "--law"),
        (["--gpu", "h100", "--gpus", "0", "--hours", "1"], "--gpus"),
        ([], "budget"),
    ],
)
def test_bad_input_one_line_exit_2(cli, args, flag):
    code, out, err = cli("plan", *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and flag in lines[0]
    assert "Traceback" not in err


def test_debug_shows_traceback(cli):
    from domainlm.errors import UserError

    with pytest.raises(UserError):
        from domainlm.cli import main

        main(["--debug", "plan", "--flops", "0"])
    import domainlm.cli

    domainlm.cli.DEBUG = False


def test_tiny_budget_with_big_vocab_warns():
    p = make_plan(PlanRequest(flops=1e15, vocab_size=131072))
    assert any("vocab" in w for w in p["warnings"])


def test_plan_chart_labels_do_not_overlap():
    """The known models' labels (Chinchilla / LLaMA / Llama-2 / BloombergGPT, OPT / GPT-3 / BLOOM are neighbours)
    each get a spot where no other label covers them."""
    import matplotlib.pyplot as plt

    from domainlm.plan import chart

    fig = chart.plan_figure(make_plan(PlanRequest(flops=5.76e23)))
    names = [name for name, _, _ in chart.KNOWN_MODELS]
    texts = [t for t in fig.axes[0].texts if t.get_text() in names]
    assert sorted(t.get_text() for t in texts) == sorted(names)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes[:i]):
            assert not a.overlaps(b), (texts[i].get_text(), texts[j].get_text())
    plt.close(fig)
