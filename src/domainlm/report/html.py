"""`domainlm report RUN_DIR`: one self-contained HTML page (plus its PNGs) from the files of a run directory.

Each section reads one stage's output; when that file is missing or unreadable the section says which
command writes it instead of failing, so a report can be made at any point of a run. The page has inline
CSS, images as base64 data URIs and no JavaScript: it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape as rich_escape

from domainlm import __version__, faults, objectives
from domainlm.config import validate
from domainlm.errors import ConfigError, UserError
from domainlm.model.base import base_of
from domainlm.outputs import AnyEval, ObjectiveEvalOutput
from domainlm.plan.chart import plot_plan
from domainlm.report import plots
from domainlm.rundir import RunDir, atomic_write, load_output, publish, temp_path
from domainlm.units import human

REPORT_DIR = str(Path(RunDir.REPORT).parent)
# Every PNG this module may write; ones not made this time are deleted, so the folder never shows a stale chart.
PNGS = (RunDir.PLAN_CHART, "drops.png", "tokens.png", "epochs.png", "bytes_per_token.png", "loss.png", "eval_bpb.png",
        "probes.png", "ablation.png", "decide.png", "mix.png", "mine.png")



@dataclass(frozen=True)
class Catalog:
    """What the report knows of the run directory's files, from the stage registry (pipeline.py): each output's
    model and the command that writes it (shown when the file is missing)."""

    schemas: dict[str, Any]
    producers: dict[str, str]

    @staticmethod
    def _declared(rel: str, table: dict):
        # a token folder of another tokenizer (continued pretraining's base): declared as the run's own
        return table[RunDir.COUNTS if rel not in table and rel.endswith(RunDir.COUNTS_FILE) else rel]

    def command(self, rel: str) -> str:
        return self._declared(rel, self.producers)

    def schema(self, rel: str):
        return self._declared(rel, self.schemas)


BASELINE = "general-only baseline (domain weight 0)"


@dataclass
class Section:
    id: str
    title: str
    body: list[str] = field(default_factory=list)  # HTML fragments
    hints: list[str] = field(default_factory=list)  # plain text: what to run to fill the gaps
    images: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.hints


class Report:
    """The state one report build shares between sections: where to read, where to write, what was drawn."""

    def __init__(self, run_dir: Path, catalog: Catalog):
        self.run_dir = run_dir
        self.catalog = catalog
        self.out = run_dir / REPORT_DIR
        self.cache: dict[str, tuple[object, str | None]] = {}

    def read(self, rel: str):
        """(the file as its model of outputs.SCHEMAS, or the metrics rows; None), or (None, why not) where why-not
        names the file and the command to run."""
        if rel not in self.cache:
            self.cache[rel] = self._read(rel)
        return self.cache[rel]

    def _read(self, rel: str):
        path = self.run_dir / rel
        cmd = self.catalog.command(rel).format(run=self.run_dir)
        if not path.exists():
            return None, f"no {rel} yet: run `{cmd}`"
        try:
            if rel == RunDir.METRICS:
                return _jsonl(path.read_text(encoding="utf-8")), None
            return load_output(path, self.catalog.schema(rel)), None
        except (OSError, UnicodeDecodeError, UserError) as e:
            return None, f"{e} (`{cmd}`)"

    def figure(self, section: Section, draw, name: str, *args) -> None:
        """Draw one chart into the report folder and embed it; a chart that cannot be drawn becomes a hint."""
        try:
            path = draw(*args, self.out / name)
        except (KeyError, TypeError, ValueError) as e:
            section.hints.append(f"could not draw {name} ({type(e).__name__}: {e})")
            return
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        section.body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{escape(section.title)}: '
                            f'{escape(name)}"><figcaption>{escape(name)}</figcaption></figure>')
        section.images.append(name)


def optional_section(rel: str, sid: str, title: str):
    """A report section shown only once the command writing ``rel`` has run: the decorated ``fill(r, data, s)``
    gets the file as its model and the empty section; the section is left out while ``rel`` is absent, and shows
    only the hint when the file is there but unreadable."""

    def wrap(fill):
        @functools.wraps(fill)
        def make(r: Report) -> Section | None:
            data, why = r.read(rel)
            if data is None and why.startswith("no "):
                return None
            s = Section(sid, title)
            if data is None:
                s.hints.append(why)
                return s
            return fill(r, data, s)

        return make

    return wrap


def _jsonl(text: str) -> list[dict]:
    # The last line may be half-written while training runs: skip lines that do not parse.
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ HTML helpers


def _num(x, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return fmt.format(x)


def _table(header: list[str], rows: list[list[str]], *, cls: str = "") -> str:
    """A table whose cells are already HTML; numbers right-aligned by the CSS (every column but the first)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def _hint_html(hint: str) -> str:
    # `command` spans become <code>; the rest is escaped text.
    parts = escape(hint).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


# ------------------------------------------------------------------------------------------------ sections


def plan_section(r: Report) -> Section:
    s = Section("plan", "Plan: model size and token budget")
    plan, why = r.read(RunDir.PLAN)
    if plan is None:
        s.hints.append(why)
        return s

    def draw(p, path: Path) -> Path:
        tmp = temp_path(path)  # ends in .png: plot_plan picks the format by suffix
        plot_plan(p, tmp)
        return publish(tmp, path)

    m = plan.model
    s.body.append(_table(["", ""], [
        ["compute", f"{plan.compute_flops:.3g} FLOPs"],
        ["scaling law", escape(str(plan.law["name"]))],
        ["parameters", f"{human(plan.params)} (shape: {m.n_layers} layers × d_model {m.d_model}, "
                       f"{human(m.params_total)} total)"],
        ["training tokens", f"{human(plan.tokens)} ({plan.tokens_per_param:.1f} tokens/param)"],
        ["effective tokens (repeats discounted)", human(plan.effective_tokens)],
        ["vocabulary", "-" if not plan.vocabulary else
         escape(f"{plan.vocabulary['vocab_size']:,} ({plan.vocabulary['from']}); N_v = V·d "
                f"{human(plan.vocabulary['params_vocabulary'])}, non-vocabulary "
                f"{human(plan.vocabulary['params_non_vocabulary'])}")],
        ["predicted loss", "none: below the range the law was fitted on (the small-scale rule chose the shape)"
         if plan.small_scale else _num(plan.predicted_loss)],
        ["GPU hours", _num(plan.gpu_hours, "{:,.1f}")],
    ], cls="kv"))
    run = plan.run  # what the run trains: the plan, or each override of it next to its reason
    rows = [[escape(o.what), escape(o.plan), escape(o.run), escape(o.reason)] for o in run.overrides]
    title = ("<h3>This run follows the plan</h3>" if run.follows_plan else
             '<h3>This run does not follow the plan</h3><p class="warn">The config overrides the law\'s plan; '
             "the numbers above are the law's, the run trains these:</p>")
    s.body.append(title + (_table(["", "plan (law)", "this run", "why"], rows) if rows else ""))
    trained, _ = r.read(RunDir.TRAIN)
    timing = [["planned training time", _num(run.planned_seconds, "{:,.0f} s")],
              ["budget (budget.hours)", _num(run.budget_seconds, "{:,.0f} s")],
              ["actual training time", _num(trained.train_seconds if trained else None, "{:,.0f} s")],
              ["tokens/s the plan used", escape(f"{_num(run.tokens_per_s, '{:,.0f}')} "
                                                f"({run.tokens_per_s_from or '-'})")]]
    s.body.append(_table(["", ""], timing, cls="kv"))
    r.figure(s, draw, RunDir.PLAN_CHART, plan.model_dump(exclude_unset=True))
    if plan.sources:
        rows = [[escape(n), _num(v.weight, "{:.0%}"), human(v.tokens), human(v.unique_tokens),
                 _num(v.epochs, "{:.2f}"), human(v.effective_tokens)] for n, v in plan.sources.items()]
        s.body.append("<h3>Mixture</h3>" + _table(
            ["source", "weight", "tokens", "unique tokens", "epochs", "effective tokens"], rows))
    for w in plan.warnings:
        s.body.append(f'<p class="warn">{escape(w)}</p>')
    return s


def _counts_rel(run_dir: Path) -> str:
    """tokens/counts.json, or with ``train.init_from`` (continued pretraining) the counts of the base tokenizer's
    token folder (`RunDir.tokens_for`), the files that run trained on."""

    try:
        data = yaml.safe_load((run_dir / RunDir.CONFIG).read_text(encoding="utf-8"))
        if isinstance(data, dict) and (data.get("train") or {}).get("init_from"):

            folder = RunDir(run_dir).tokens_for(base_of(validate(data)).path)
            return str(folder.relative_to(run_dir) / RunDir.COUNTS_FILE)
    except (OSError, UserError, ConfigError, yaml.YAMLError, ValueError):
        pass  # no config, or its base is gone: the run's own token files
    return RunDir.COUNTS


def data_section(r: Report) -> Section:
    s = Section("data", "Data: cleaning, deduplication, tokens, epochs")
    stats, why = r.read(RunDir.STATS)
    if stats is None:
        s.hints.append(why)
    else:
        rows = [[escape(n), f"{v.docs_in:,}", human(v.bytes_in, "B"), f"{v.docs_out:,}", human(v.bytes_out, "B"),
                 f"{v.train_docs:,}", f"{v.val_docs:,}", f"{sum(v.drops.values()):,}"]
                for n, v in stats.sources.items()]
        s.body.append(_table(["source", "docs in", "bytes in", "docs out", "bytes out", "train docs", "val docs",
                              "dropped"], rows))
        r.figure(s, plots.drops_chart, "drops.png", stats)

    counts, why = r.read(_counts_rel(r.run_dir))
    if counts is None:
        s.hints.append(why)
    else:
        rows = [[escape(n), human(c.train_tokens), human(c.val_tokens),
                 _num(c.train_bytes / c.train_tokens if c.train_tokens else None, "{:.2f}")]
                for n, c in counts.sources.items()]
        s.body.append("<h3>Tokens</h3>" + _table(["source", "train tokens (unique)", "val tokens",
                                                  "train bytes/token"], rows))
        r.figure(s, plots.tokens_chart, "tokens.png", counts)

    plan, _ = r.read(RunDir.PLAN)
    planned = {n: v.epochs for n, v in (plan.sources if plan else {}).items() if v.epochs is not None}
    trained = _last_epochs(r)
    if planned or trained:
        s.body.append("<h3>Epochs</h3><p>How many times each source's unique tokens are seen: planned by "
                      "<code>plan.json</code>, reached by training (last logged step).</p>")
        r.figure(s, plots.epochs_chart, "epochs.png", planned, trained)
    return s


def _last_epochs(r: Report) -> dict[str, float]:
    rows, _ = r.read(RunDir.METRICS)
    train = [x for x in rows or [] if x.get("kind") == "train"]
    if not train:
        return {}
    return {k.removeprefix("epochs/"): v for k, v in train[-1].items() if k.startswith("epochs/")}


def tokenizer_section(r: Report) -> Section:
    s = Section("tokenizer", "Tokenizer audit")
    a, why = r.read(RunDir.AUDIT)
    if a is None:
        s.hints.append(why)
        return s
    base = a.baseline
    s.body.append(f"<p>{escape(a.kind)} tokenizer, vocab {a.vocab_size_trained:,}; "
                  + (f"baseline: same kind and size trained on {escape(', '.join(base.sources))} alone."
                     if base else "no general source, so no baseline.") + "</p>")
    rows = [[escape(n), escape(v.role), f"{v.val_bytes:,}", _num(v.bytes_per_token),
             _num(v.baseline_bytes_per_token), _num(v.gain_pct, "{:+.1f}%")] for n, v in a.bytes_per_token.items()]
    s.body.append(_table(["source", "role", "val bytes", "bytes/token", "baseline", "gain"], rows))
    r.figure(s, plots.bytes_per_token_chart, "bytes_per_token.png", a)
    if a.domain_terms:
        def pieces(tokens):  # show spaces, so " res" and "res" differ; '|' separates tokens
            return "<code>" + escape("|".join(t.replace(" ", "␣") for t in tokens)) + "</code>"

        header = ["term", "ours", "tokens"] + (["baseline", "tokens"] if base else [])
        rows = [[escape(t.term), pieces(t.tokens), str(t.count)]
                + ([pieces(t.baseline_tokens), str(t.baseline_count)] if base else []) for t in a.domain_terms]
        s.body.append("<h3>Domain terms (as split mid-sentence)</h3>" + _table(header, rows, cls="terms"))
        tm = a.summary.get("terms")
        if tm and tm.get("baseline_mean_tokens") is not None:
            s.body.append(f"<p>{tm['mean_tokens']:.2f} tokens per term on average ({tm['single_token']}/{tm['n']} "
                          f"single-token) vs {tm['baseline_mean_tokens']:.2f} ({tm['baseline_single_token']}/"
                          f"{tm['n']}) for the baseline.</p>")
    return s


def training_section(r: Report) -> Section:
    s = Section("training", "Training: loss curves")
    rows, why = r.read(RunDir.METRICS)
    if rows is None:
        s.hints.append(why)
        return s
    train = [x for x in rows if x.get("kind") == "train"]
    evals = [x for x in rows if x.get("kind") == "eval"]
    if not train and not evals:
        s.hints.append("logs/metrics.jsonl has no rows yet: run `domainlm train CONFIG`")
        return s
    sources = list(dict.fromkeys(k.split("/", 1)[1] for e in evals for k in e if k.startswith(("val_loss/", "bpb/"))))
    r.figure(s, plots.loss_chart, "loss.png", train, evals, sources)
    kv = []
    if train:
        last = train[-1]
        tail = [x["loss"] for x in train[-10:] if isinstance(x.get("loss"), (int, float))]
        kv += [["steps", f"{last['step']:,}"], ["tokens seen", human(last.get("tokens"))],
               ["train loss (mean of last 10 steps)", _num(sum(tail) / len(tail) if tail else None, "{:.4f}")],
               ["throughput", f"{human(last.get('tokens_per_s'))} tokens/s"],
               ["MFU", _num(last.get("mfu"), "{:.1%}")],
               ["skipped steps (NaN/inf)", f"{sum(bool(x.get('skipped')) for x in train):,}"]]
    if evals:
        e = evals[-1]
        for n in sources:
            kv.append([f"val {escape(n)} at step {e['step']:,}",
                       f"{_num(e.get(f'val_loss/{n}'), '{:.4f}')} nats/token, {_num(e.get(f'bpb/{n}'), '{:.4f}')} bpb"])
    s.body.append(_table(["", ""], kv, cls="kv"))
    return s


def _baselines(r: Report) -> list[tuple[str, AnyEval]]:
    """The general-only baseline (`domainlm run`'s weight-0 variant), when it has been scored."""
    base, _ = r.read(RunDir.BASELINE_EVAL)
    return [(BASELINE, base)] if base is not None else []


def eval_section(r: Report) -> Section:
    s = Section("eval", "Evaluation: bits per byte")
    ev, why = r.read(RunDir.EVAL)
    if ev is None:
        s.hints.append(why)
        return s
    if not ev.sources:
        s.hints.append(f"eval/eval.json has no per-source scores: run `domainlm eval {r.run_dir}`")
        return s
    baselines = _baselines(r)
    if isinstance(ev, ObjectiveEvalOutput):  # a masked-LM encoder / span encoder-decoder (evaluate/objective.py)
        return _objective_eval(s, ev, baselines)
    header = ["text", "role", "bits/byte"]
    for label, _ in baselines:
        header += [f"{label} bits/byte", "Δ vs it"]
    header += ["loss/token (nats)", "ppl", "tokens", "bytes", "bytes/token"]
    rows = []
    for n, v in ev.sources.items():
        row = [escape(n), escape(v.role), f"<b>{_num(v.bpb, '{:.4f}')}</b>"]
        for _, b in baselines:
            theirs = b.sources[n].bpb if n in b.sources else None
            row += [_num(theirs, "{:.4f}"), _num(v.bpb / theirs - 1 if theirs else None, "{:+.1%}")]
        row += [_num(v.loss_per_token, "{:.4f}"), _num(v.ppl, "{:.2f}"), f"{v.tokens:,}", f"{v.bytes:,}",
                _num(v.bytes_per_token, "{:.2f}")]
        rows.append(row)
    s.body.append(_table(header, rows))
    s.body.append("<p class=note>Bits per byte compares models with different tokenizers; loss per token and "
                  "perplexity do not. Negative Δ: this model is better.</p>")
    r.figure(s, plots.eval_chart, "eval_bpb.png", ev, baselines)
    base, why = r.read(RunDir.BASELINE_EVAL)
    if base is None and not why.startswith("no "):
        s.hints.append(why)
    elif base is None:
        s.body.append("<p class=note>No baseline model: the general-only baseline is trained by "
                      "<code>domainlm run</code> (or <code>domainlm ablate</code> with weight 0).</p>")
    return s


def _objective_eval(s: Section, ev: ObjectiveEvalOutput, baselines: list[tuple[str, AnyEval]]) -> Section:
    """eval.json of a masked / span model: its loss and accuracy on fixed masks (no bpb), next to the baseline's."""
    what = objectives.get(ev.objective).targets_title
    s.title = f"Evaluation: {what} ({ev.objective} model)"
    header = ["text", "role", "loss (nats/target)", "accuracy"]
    for label, _ in baselines:
        header += [f"{label} loss", f"{label} accuracy"]
    rows = []
    for n, v in ev.sources.items():
        row = [escape(n), escape(v.role), f"<b>{_num(v.loss, '{:.4f}')}</b>", _num(v.accuracy, "{:.1%}")]
        for _, b in baselines:
            theirs = b.sources.get(n)
            row += [_num(getattr(theirs, "loss", None), "{:.4f}"), _num(getattr(theirs, "accuracy", None), "{:.1%}")]
        rows.append(row + [f"{v.targets:,}", f"{v.bytes:,}"])
    s.body.append(_table(header + [what, "bytes"], rows))
    s.body.append(f"<p class=note>{escape(ev.comparable)}. Masks: {escape(json.dumps(ev.masking))}.</p>")
    return s


def probes_section(r: Report) -> Section:
    s = Section("probes", "Domain term probes")
    ev, why = r.read(RunDir.EVAL)
    if ev is None:
        s.hints.append(why)
        return s
    p = ev.probes
    if not p:
        s.hints.append(f"no probe scores in eval/eval.json: run `domainlm eval {r.run_dir} --probes FILE` "
                       "(or set eval.probes in the config)")
        return s
    models = [("this model", p)] + [(label, b.probes) for label, b in _baselines(r) if b.probes]
    rows = [[escape(label), str(q.items), _num(q.acc, "{:.1%}"), _num(q.acc_per_byte, "{:.1%}"),
             _num(q.chance, "{:.1%}")] for label, q in models]
    s.body.append(f"<p>Cloze items from <code>{escape(p.file)}</code>: the right term must get a "
                  "higher log-probability than every distractor.</p>")
    s.body.append(_table(["model", "items", "accuracy", "per-byte normalised", "chance"], rows))
    r.figure(s, plots.probes_chart, "probes.png", models)
    if p.results:
        rows = [[escape(x.term), "✓" if x.correct else "✗", "✓" if x.correct_per_byte else "✗",
                 escape(", ".join(f"{v:.2f}" for v in x.logprobs))] for x in p.results]
        s.body.append(f"<details><summary>all {len(p.results)} items (log-probabilities: right answer first)"
                      "</summary>" + _table(["term", "right", "right (per byte)", "log-probs"], rows) + "</details>")
    return s


@optional_section(RunDir.MINE, "mine", "Mined domain documents")
def mine_section(r: Report, m, s: Section) -> Section:
    """Only when `domainlm mine` has run: yield and precision per round, the score histogram, a few samples."""
    rows = [[str(x.round), _num(x.threshold, "{:.2f}"), _num(x.heldout_precision), _num(x.heldout_recall),
             _num(x.prevalence, "{:.1%}"), _num(x.est_precision), f"{x.scored:,}", f"{x.accepted:,}",
             f"{x.new_docs:,}", human(x.new_bytes, "B"), _num(x.yield_fraction, "{:.1%}"),
             escape(", ".join(f"{k} {v:,}" for k, v in x.drops.items()) or "-")] for x in m.rounds]
    s.body.append(f"<p>{m.docs:,} documents ({human(m.bytes, 'B')}, ≈{human(m.tokens)} tokens at "
                  f"{m.bytes_per_token:g} bytes per token: {escape(m.bytes_per_token_from)}) mined from "
                  f"{escape(', '.join(m.pools))} into the source <code>{escape(m.source)}</code> "
                  f"(<code>{RunDir.MINE_DOCS}/</code>); target precision {m.target_precision:g}; stopped: "
                  f"{escape(m.stopped)}.</p>")
    s.body.append(_table(["round", "threshold", "held-out precision", "held-out recall", "est. domain share of pool",
                          "est. precision in pool", "scored", "accepted", "new", "new bytes", "yield",
                          "dropped (score ≥ floor)"], rows))
    s.body.append("<p class=note>Held-out: seeds kept out of the classifier's training (balanced classes). The "
                  "precision in the pool is estimated from the held-out rates and the pool's score distribution "
                  "(adjusted classify-and-count, Forman 2008). Yield: the round's new documents as a share of all "
                  "mined so far (DeepSeekMath stopped when a round added ~2%).</p>")
    r.figure(s, plots.mine_chart, "mine.png", m)
    if m.samples:
        s.body.append("<details><summary>samples across the range of scores</summary>" + _table(
            ["score", "round", "id", "text (start)"],
            [[f"{x.score:.3f}", str(x.round), escape(x.id), escape(x.text)] for x in m.samples]) + "</details>")
    return s


@optional_section(RunDir.ABLATE, "ablation", "Mixture ablation: domain weight vs bits per byte")
def ablation_section(r: Report, ab, s: Section) -> Section:
    """Only when `domainlm ablate` has run: the section is left out of the page otherwise."""
    sources = list(dict.fromkeys(k for x in ab.results for k in x.bpb))

    def cell(x, k: str) -> str:
        ci = (x.ci95 or {}).get(k)
        pts = " ".join(f"{p['bpb'][k]:.4f}" for p in x.seeds or [] if k in p["bpb"])
        return (_num(x.bpb.get(k), "{:.4f}") + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
                + (f"<br><span class=note>seeds: {pts}</span>" if pts else ""))

    rows = [[_num(x.domain_weight, "{:.0%}"), *(cell(x, k) for k in sources),
             _num(x.role_bpb("domain"), "{:.4f}"), _num(x.role_bpb("general"), "{:.4f}")]
            for x in sorted(ab.results, key=lambda x: x.domain_weight)]
    s.body.append(_table(["domain weight", *(f"{k} bpb" for k in sources), "domain (mean)", "general (mean)"], rows))
    seeds = len(ab.results[0].seeds or [1]) if ab.results else 1
    s.body.append("<p class=note>95% intervals: hierarchical bootstrap over "
                  + (f"{seeds} training seeds and " if seeds > 1 else "") + "val documents"
                  + ("" if seeds > 1 else " (one training seed: `domainlm ablate --seeds K` adds training variance)")
                  + ".</p>")
    r.figure(s, plots.ablation_chart, "ablation.png", ab)
    return s


@optional_section(RunDir.MIX, "mix", "The mixture, chosen by a law")
def mix_section(r: Report, m, s: Section) -> Section:
    """Only when `domainlm mix` has run (mix/stage.py): the fitted law per source, the held-out weight's prediction
    beside its measured bpb, the recommended weight with its interval, and the frontier."""
    rec = m.recommended
    d = m.design
    s.body.append(f"<p>{len(m.runs)} runs ({len(d['weights'])} domain weights × {d['seeds']} seeds × "
                  f"{len(d['budgets'])} budgets: {', '.join(human(b) for b in d['budgets'])} tokens) of the run's "
                  "model fitted per source to bpb = c + k·exp(t·ρ)·(D′/D_ref)^−β (Ye et al. 2024's mixing law, "
                  "with Muennighoff et al. 2023's effective data D′ for a repeated corpus; ρ is the domain share "
                  "of D′). 95% bootstrap intervals over runs.</p>")

    def ci(x, fmt="{:.3f}"):
        return f"{fmt.format(x.value)} [{fmt.format(x.ci95[0])}, {fmt.format(x.ci95[1])}]"

    rows = [[escape(k), escape(m.sources[k].role), ci(v.c), ci(v.k), ci(v.t), ci(v.beta), _num(v.rmse, "{:.4f}")]
            for k, v in m.law.items()]
    s.body.append(_table(["source", "role", "c", "k", "t", "β", "rmse"], rows))
    h = m.held_out
    rows = [[escape(x.source), human(x.tokens), f"{x.measured:.4f}", f"{x.predicted:.4f}",
             f"[{x.pi95[0]:.4f}, {x.pi95[1]:.4f}]", "yes" if x.inside else "<b>no</b>"] for x in h.rows]
    s.body.append(f"<p>Held-out check: the law fitted without domain weight {h.weight:g} ({h.runs_fitted} runs) "
                  "predicts it:</p>")
    s.body.append(_table(["source", "tokens", "measured (mean of seeds)", "predicted",
                          "95% interval for that mean", "inside"], rows))
    preds = "; ".join(f"{escape(k)} {p.bpb:.4f} [{p.ci95[0]:.4f}, {p.ci95[1]:.4f}] (general-only "
                      f"{p.general_only_bpb:.4f})" for k, p in rec.predicted.items())
    s.body.append(f"<p><b>Recommended domain weight at {human(rec.tokens)} tokens: {rec.domain_weight:.3f} "
                  f"(95% CI {rec.ci95[0]:.3f}–{rec.ci95[1]:.3f})</b> — {escape(rec.objective)}. Predicted bpb: "
                  f"{preds}.</p>")
    for note in m.notes:
        s.body.append(f"<p class=note>{escape(note)}</p>")
    r.figure(s, plots.mix_chart, "mix.png", m)
    return s


@optional_section(RunDir.DECIDE, "decide", "From scratch or continued?")
def decide_section(r: Report, d, s: Section) -> Section:
    """Only when `domainlm decide` has run (decide.py): each arm's bpb per text at equal training tokens, probes,
    compute, and the verdict with its paired-bootstrap intervals."""
    def bpb_cell(a, n: str) -> str:  # the mean, and each seed's point under it
        pts = " ".join(f"{p['bpb'][n]:.4f}" for p in a.seeds or [] if n in p["bpb"])
        return _num(a.bpb.get(n), "{:.4f}") + (f"<br><span class=note>seeds: {pts}</span>" if pts else "")

    rows = [[f"<b>{escape(arm)}</b><br><span class=note>{escape(a.label)}</span>",
             *(bpb_cell(a, n) for n in d.texts), _num(a.probes and a.probes.get("acc"), "{:.1%}"),
             human(a.trained_tokens), _num(a.flops_run, "{:.3g}"), _num(a.flops_total, "{:.3g}")]
            for arm, a in d.arms.items()]
    s.body.append(f"<p>Every arm trains on the same {human(d.tokens)} tokens of the run's mixture; "
                  f"general model: <code>{escape(d.base.path)}</code>. Bits per byte does not depend on "
                  "the tokenizer, so arms with different tokenizers compare on it.</p>")
    s.body.append(_table(["arm", *(f"{n} bpb" for n in d.texts), "probes", "trained tokens", "FLOPs (this run)",
                          "FLOPs (total)"], rows))
    s.body.append("<p>" + "<br>".join(escape(t.verdict) for t in d.texts.values()) + "</p>")
    for arm, a in d.arms.items():  # continued-vocab<N>: the extension's audit, the base tokenizer before and after
        ext = a.extension or {}
        if ext.get("added"):
            bpt = ", ".join(f"{escape(k)} {v['before']:.2f} → {v['after']:.2f}"
                            for k, v in (ext.get("bytes_per_token") or {}).items())
            tm = ext.get("terms") or {}
            terms = (f"; domain terms {tm['baseline_mean_tokens']:.2f} → {tm['mean_tokens']:.2f} tokens on average"
                     if tm.get("baseline_mean_tokens") is not None else "")
            s.body.append(f"<p class=note>{escape(arm)}: {ext['added']:,} domain tokens added to the base tokenizer "
                          f"({ext['base_vocab']:,} → {ext['vocab']:,}); bytes per token on the val splits, before → "
                          f"after: {bpt}{terms}.</p>")
    notes = [f"{escape(arm)}: skipped — {escape(why)}" for arm, why in d.skipped.items()]
    if d.base.flops is None:
        notes.append("the general model's own pretraining compute is unknown (pass --base-tokens): its arms' "
                     "totals are left out")
    over = (f"hierarchical bootstrap over {len(d.seeds)} training seeds (seeds {', '.join(map(str, d.seeds))}) and "
            "documents" if d.seeds else "paired bootstrap over documents (one training seed per arm: --seeds K "
            "adds training variance)")
    s.body.append(f"<p class=note>Margins: winner vs runner-up, 95% {over}. "
                  "FLOPs ≈ 6·N·D (total: with the general model's own pretraining). " + " ".join(notes) + "</p>")
    r.figure(s, plots.decide_chart, "decide.png", d)
    return s


@optional_section(RunDir.FINETUNE_COMPARE, "finetune", "Downstream tasks after fine-tuning: domain vs general")
def finetune_section(r: Report, ft, s: Section) -> Section:
    """Only when `domainlm finetune --compare` has run: downstream scores of the fine-tuned domain and general
    models side by side, with paired-bootstrap CIs (finetune/compare.py writes the file)."""
    return _comparison(ft, s)


@optional_section(RunDir.CLASSIFY_COMPARE, "classify", "Downstream classification: domain vs general model")
def classify_section(r: Report, ft, s: Section) -> Section:
    """Only when `domainlm finetune --head classification --compare` has run (or `domainlm run` of a config with
    a ``downstream`` section): the two classifiers' accuracy and macro-F1 against the majority class."""
    return _comparison(ft, s)


def _comparison(ft, s: Section) -> Section:
    """The body of the two fine-tuning comparison sections (compare.json's model: per task and metric, both
    models with their intervals and the difference)."""
    def ci(m, fmt: str = "{:.1%}") -> str:
        return f"{fmt.format(m.value)} [{fmt.format(m.ci95[0])}, {fmt.format(m.ci95[1])}]"

    rows = [[escape(task), escape(name), ci(t.domain.metrics[name]), ci(t.general.metrics[name]),
             f"<b>{ci(t.domain_minus_general[name], '{:+.1%}')}</b>"]
            for task, t in ft.tasks.items() for name in t.domain.metrics]
    for task, t in ft.tasks.items():
        if t.majority_accuracy is not None:  # what always answering the largest class scores
            f1 = t.majority_macro_f1
            rows.append([escape(task), f"majority class ({escape(str(t.majority_class))})",
                         f"accuracy {t.majority_accuracy:.1%}" + (f", macro-F1 {f1:.1%}" if f1 is not None else ""),
                         "", ""])
    s.body.append(_table(["task", "metric", "domain", "general", "domain − general"], rows))
    s.body.append("<p class=note>" + "; ".join(f"{escape(k)}: <code>{escape(v)}</code>" for k, v in ft.models.items())
                  + "</p>")
    s.body.append(f"<p class=note>{escape(ft.verdict)}. 95% bootstrap intervals over test items (paired "
                  "for the difference); both models fine-tuned with the same data, steps and seed.</p>")
    return s


def summary_html(r: Report) -> str:
    """The headline numbers: what the run bought, in one table at the top (none before plan or eval)."""
    plan, _ = r.read(RunDir.PLAN)
    ev, _ = r.read(RunDir.EVAL)
    trained, _ = r.read(RunDir.TRAIN)
    items = []
    if trained:  # what was trained (the config may fix a shape other than the plan's)
        line = f"{human(trained.params)} params trained for {trained.steps:,} steps"
        if plan:
            line += f" (plan: {human(plan.model.params_total)} params, {human(plan.tokens)} tokens)"
        items.append(["model", line])
    elif plan:
        items.append(["model", f"{human(plan.model.params_total)} params, {human(plan.tokens)} tokens planned"])
    if ev:
        baselines = _baselines(r)
        for n, v in ev.sources.items():
            if isinstance(ev, ObjectiveEvalOutput):  # a masked / span model: its loss and accuracy on fixed masks
                items.append([f"{escape(n)} ({escape(v.role)})", f"{_num(v.loss, '{:.4f}')} nats per {ev.objective} "
                              f"target, accuracy {_num(v.accuracy, '{:.1%}')}"])
                continue
            line = f"{_num(v.bpb, '{:.4f}')} bits/byte"
            for label, b in baselines:
                theirs = b.sources[n].bpb if n in b.sources else None
                if theirs:
                    line += f" (vs {theirs:.4f} for {escape(label)}: {v.bpb / theirs - 1:+.1%})"
            items.append([f"{escape(n)} ({escape(v.role)})", line])
        if ev.probes:
            items.append(["term probes", f"{ev.probes.acc:.1%} (chance {ev.probes.chance:.1%})"])
    return _table(["", ""], items, cls="kv summary") if items else ""


# ------------------------------------------------------------------------------------------------ page

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0;background:#f6f6f8}
main{max-width:1150px;margin:0 auto;padding:24px 32px;background:#fff;min-height:100vh}
h1{margin:0 0 4px}h2{border-bottom:2px solid #e3e3e8;padding-bottom:4px;margin-top:36px}
.meta{color:#666;font-size:13px}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:6px 18px}
nav a{text-decoration:none;color:#0a58ca}.ok{color:#198754}.todo{color:#b26a00}
table{border-collapse:collapse;margin:10px 0;font-size:13.5px}
th,td{border:1px solid #dcdce2;padding:4px 9px;text-align:right;vertical-align:top}
th{background:#f0f0f4}td:first-child,th:first-child{text-align:left}
table.kv td:last-child,table.terms td{text-align:left}
figure{margin:14px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#888}
.hint{background:#fff7e6;border-left:4px solid #f0a020;padding:6px 12px;margin:8px 0}
.warn{background:#fdecea;border-left:4px solid #d9534f;padding:6px 12px}
.note{color:#555;font-size:13px}code{background:#f2f2f5;padding:1px 4px;border-radius:3px}
details{margin:8px 0}summary{cursor:pointer;color:#0a58ca}
"""


def render(r: Report, sections: list[Section], now: str) -> str:
    nav = "".join(f'<li><a href="#{s.id}">{escape(s.title)}</a> '
                  f'<span class="{"ok" if s.complete else "todo"}">{"✓" if s.complete else "…"}</span></li>'
                  for s in sections)
    parts = []
    for s in sections:
        hints = "".join(f'<p class="hint">{_hint_html(h)}</p>' for h in s.hints)
        parts.append(f'<section id="{s.id}"><h2>{escape(s.title)}</h2>{hints}{"".join(s.body)}</section>')
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>domainlm report: {escape(r.run_dir.name)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body><main>"
        f"<h1>domainlm report: {escape(r.run_dir.name)}</h1>"
        f'<p class="meta">run directory <code>{escape(str(r.run_dir))}</code> · made {now} by domainlm '
        f"{__version__}</p>{summary_html(r)}<nav><ul>{nav}</ul></nav>{''.join(parts)}"
        "</main></body></html>\n"
    )


def build_report(run_dir: Path | str, makers: list, catalog: Catalog) -> dict:
    """Write ``<run>/report/index.html`` and its PNGs from the sections ``makers`` make (page order; one that
    returns None is left out); return what was written and what is missing. The stage registry
    (`pipeline.build_report`) passes every stage's sections and the catalog of outputs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory (make one with `domainlm plan CONFIG`)")
    r = Report(run_dir, catalog)
    r.out.mkdir(exist_ok=True)
    sections = []
    for make in makers:
        s = make(r)
        if s is not None:
            sections.append(s)
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = RunDir(run_dir).report
    html = render(r, sections, now)
    faults.hit("report.mid_write")
    atomic_write(page, html)
    made = {name for s in sections for name in s.images}
    for name in PNGS:
        if name not in made:
            (r.out / name).unlink(missing_ok=True)
    return {
        "path": str(page),
        "sections": {s.id: {"title": s.title, "complete": s.complete, "hints": s.hints, "images": s.images}
                     for s in sections},
    }


def print_report(result: dict, console) -> None:
    for s in result["sections"].values():
        mark = "[green]✓[/]" if s["complete"] else "[yellow]…[/]"
        console.print(f"{mark} {s['title']}", highlight=False)
        for h in s["hints"]:
            console.print(f"    {h}", style="yellow", highlight=False, markup=False, soft_wrap=True)

    console.print(f"wrote [bold]{rich_escape(result['path'])}[/]")
