"""Readable tables for `domainlm plan` and `domainlm memory`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from domainlm.memory import SHARDING_NAMES
from domainlm.units import human


def _f(x, unit="") -> str:
    return "-" if x is None else human(x, unit)


def print_plan(p: dict, console: Console) -> None:
    c = p["compute"]
    if c["method"] == "gpu":
        how = (f"{c['gpus']}× {c['gpu']} × {c['hours']:g} h × MFU {c['mfu']:.0%} of "
               f"{c['peak_flops_per_gpu'] / 1e12:g} TFLOP/s bf16")
    elif c["method"] == "cpu-probe":
        rate = c.get("hardware_flops_per_s") or c["measured_flops_per_s"] * c["gpus"]
        probe = c.get("shape_probe") or {}
        on = ("the base model" if probe.get("base") else
              "the plan's shape" if probe.get("model", {}).get("d_model") == p["model"]["d_model"]
              and probe.get("model", {}).get("n_layers") == p["model"]["n_layers"] else "the generic probe")
        how = f"{c['gpus']}× cpu × {c['hours']:g} h at {rate / 1e9:.1f} GFLOP/s measured on {on}"
    else:
        how = "given"
    m = p["model"]
    t = Table(title=f"domainlm plan — law {p['law']['name']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    hw = c.get("hardware_flops")
    shown = (f"{p['compute_flops']:.3g} FLOPs as 6·N·D ({hw:.3g} hardware FLOPs: {how})" if how != "given" and hw
             else f"{p['compute_flops']:.3g} FLOPs ({how})")
    t.add_row("compute", shown)
    t.add_row("law", f"{p['law']['source']}; counts {p['law']['params_counted']} params; "
              f"N ∝ C^{p['law']['a']}, D ∝ C^{p['law']['b']}")
    if p["law"].get("E") is not None:
        lc = p["law"]
        t.add_row("L(N, D)", f"E + A/N^α + B/D^β: E={lc['E']:.4g}, A={lc['A']:.4g}, B={lc['B']:.4g}, "
                  f"α={lc['alpha']:.4g}, β={lc['beta']:.4g}")
    cont = p.get("continued")
    if cont:  # train.init_from: N is the base's, the budget buys tokens only
        t.add_row("continued", f"from {cont['init_from']}: {cont['how']}")
    t.add_row("params", f"{_f(p['params'])}  ({'the base model' if cont else p['law']['params_counted']})")
    t.add_row("tokens", f"{_f(p['tokens'])}  ({p['tokens_per_param']:.1f} tokens/param)")
    if p["predicted_loss"] is not None:
        t.add_row("predicted loss", f"{p['predicted_loss']:.3f} nats/token (the law's own data)")
    t.add_row("model", f"{m['architecture'] + ': ' if cont else ''}{m['n_layers']} layers × d_model {m['d_model']}, "
              f"{m['n_heads']} heads of {m['head_dim']}, {'ffn' if cont else 'SwiGLU ffn'} {m['ffn_dim']}, "
              f"vocab {m['vocab_size']}")
    t.add_row("", f"{_f(m['params_total'])} total = {_f(m['params_non_embedding'])} non-embedding + "
              f"{_f(m['params_total'] - m['params_non_embedding'])} embedding")
    voc = p.get("vocabulary")
    if voc:  # Tao et al. 2024: vocabulary and non-vocabulary parameters apart
        t.add_row("vocabulary", f"{voc['vocab_size']:,} ({voc['from']}); the law's optimum here "
                  f"{voc['recommended_exact']:,.0f} → {voc['recommended']:,} (a multiple of 64, ≥ 512; approach 2: "
                  f"{voc['approach2']:,.0f}); "
                  f"N_v = V·d {_f(voc['params_vocabulary'])}, N_nv {_f(voc['params_non_vocabulary'])}, embeddings "
                  f"{voc['embedding_share']:.0%} of the parameters"
                  + ("" if voc["in_fitted_range"] else "; outside the law's fitted range (33M–2.87B N_nv)"))
    small = p.get("small_scale")
    if small:
        t.add_row("below range", f"the law's own optimum {_f(small['law_params'])} params on "
                  f"{_f(small['law_tokens'])} tokens is an extrapolation; {small['rule']}")
    t.add_row("FLOPs/token", f"{p['flops_per_token']:.3g} at seq_len {p['seq_len']}")
    if p["gpu_hours"] is not None:
        t.add_row("GPU-hours" if c.get("gpu") != "cpu" else "CPU-hours", f"{p['gpu_hours']:,.1f}")
    mem = p["memory"]
    fit = "" if mem["fits"] is None else (" — fits" if mem["fits"] else " — does NOT fit")
    t.add_row("memory/GPU", f"{mem['total_gb']:.2f} GB ({mem['precision']}, {SHARDING_NAMES[mem['sharding']]}"
              f"{', ' + str(mem['gpus']) + ' GPUs' if mem['gpus'] > 1 else ''}"
              f"{', activation checkpointing' if mem.get('activation_checkpointing') else ''}){fit}")
    t.add_row("effective tokens", f"{_f(p['effective_tokens'])} (Muennighoff et al. 2023)")
    run = p.get("run")
    if run:
        rm = run["model"]
        what = "follows the plan" if run["follows_plan"] else "[bold yellow]overrides the plan[/]: " + "; ".join(
            f"{o['what']} {o['run']} instead of {o['plan']} ({o['reason']})" for o in run["overrides"])
        t.add_row("this run trains", f"{rm['n_layers']} layers × d_model {rm['d_model']} ({_f(run['params'])} params) "
                  f"on {_f(run['tokens'])} tokens — {what}")
        if run["planned_seconds"] is not None:
            budget = "" if run["budget_seconds"] is None else f" (budget {run['budget_seconds']:,.0f} s)"
            t.add_row("training time", f"{run['planned_seconds']:,.0f} s planned{budget} at "
                      f"{run['tokens_per_s']:,.0f} tokens/s, {run['tokens_per_s_from']}")
    dc = p.get("data_constrained")
    if dc:
        t.add_row("data-constrained", f"U_D {_f(dc['unique_tokens'])} unique tokens → U_N {_f(dc['unique_params'])}; "
                  f"N' {_f(dc['effective_params'])}, D' {_f(dc['effective_tokens'])}, {dc['epochs']:.1f} epochs; "
                  + ("" if dc["loss"] is None else f"L(N', D') {dc['loss']:.3f} ({dc['loss_law_note']})"))
    console.print(t)
    if p["sources"]:
        s = Table(title="mixture", title_justify="left")
        for col in ("source", "weight", "tokens", "unique tokens", "epochs", "effective"):
            s.add_column(col, justify="right" if col != "source" else "left")
        for k, r in p["sources"].items():
            ep = "-" if r["epochs"] is None else f"{r['epochs']:.2f}"
            s.add_row(k, f"{r['weight']:.3f}", _f(r["tokens"]), _f(r["unique_tokens"]), ep, _f(r["effective_tokens"]))
        console.print(s)
    if p["alternatives"]:
        limited = any(alt.get("data_constrained") for alt in p["alternatives"])
        a = Table(title="alternatives", title_justify="left")
        cols = ("option", "params", "tokens", "tok/param", "max epochs", "U_N", "N'", "D'", "L(N', D')") if limited \
            else ("option", "params", "tokens", "tok/param", "loss")
        for col in cols:
            a.add_column(col, justify="left" if col == "option" else "right", no_wrap=col == "option")
        for alt in p["alternatives"]:
            name = alt["name"] + (" (outside its range)" if alt.get("outside_range") else "")
            row = [name, _f(alt["params"]), _f(alt["tokens"]), f"{alt['tokens_per_param']:.2g}"]
            dc = alt.get("data_constrained")
            if dc:
                ep = dc["max_source_epochs"]
                row += ["-" if ep is None else f"{ep:.2f}", _f(dc["unique_params"]), _f(dc["effective_params"]),
                        _f(dc["effective_tokens"]), "-" if dc["loss"] is None else f"{dc['loss']:.3f}"]
            else:
                row += ["-"] * 5 if limited else \
                    ["-" if alt["predicted_loss"] is None else f"{alt['predicted_loss']:.3f}"]
            a.add_row(*row)
        console.print(a)
        for alt in p["alternatives"]:
            console.print(f"  [bold]{alt['name']}[/]: {alt['description']}", highlight=False)
    for n in p.get("notes", []):
        console.print(f"[dim]note:[/] {n}", highlight=False)
    for w in p["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


def print_memory(r: dict, console: Console) -> None:
    t = Table(title=f"memory per GPU — {_f(r['params'])} params, {r['precision']}, {r['optimizer']}, "
              f"{r['gpus']} GPU(s)", title_justify="left")
    t.add_column("")
    t.add_column("GB", justify="right")
    for k in ("weights", "grads", "optimizer", "activations"):
        t.add_row(k, f"{r[k + '_gb']:.2f}")
    t.add_row("[bold]total[/]", f"[bold]{r['total_gb']:.2f}[/]")
    console.print(t)
    console.print(f"sharding: {SHARDING_NAMES[r['sharding']]}; activations: {r['activations_method']}", highlight=False)
    if r["gpu_memory_gb"] is not None:
        verdict = "fits" if r["fits"] else "does NOT fit"
        console.print(f"{verdict} in {r['gpu_memory_gb']:g} GB")
        if r["recommended_sharding"]:
            console.print(f"recommended: [bold]{SHARDING_NAMES[r['recommended_sharding']]}[/] "
                          "(the least sharding that fits)")
        else:
            console.print("[yellow]nothing fits:[/] add GPUs, --activation-checkpointing, or a smaller micro-batch")
