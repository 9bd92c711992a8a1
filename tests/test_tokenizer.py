"""`domainlm tokenizer`: tiny tokenizers trained on synthetic prepared data in tmp_path."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import yaml

from domainlm import cli
from domainlm.config import load_config
from domainlm.errors import ConfigError, UserError
from domainlm.rundir import RunDir
from domainlm.tokenizer import AUDIT_FILE, run_tokenizer, sample_texts, train_bytes

LEGAL = ["the licensee shall indemnify the licensor", "notwithstanding the foregoing", "indemnification",
         "sublicensable", "irrevocable royalty-free license", "res judicata", "mens rea", "consideration",
         "hereinafter the agreement", "warranty of merchantability", "severability of provisions"]
NEWS = ["the government announced", "the football match ended", "shares rose on monday", "the minister said",
        "a new film opened", "the team won the cup", "prices fell in march", "voters went to the polls"]
TERMS = ["indemnification", "sublicensable", "notwithstanding", "res judicata", "mens rea"]


def _docs(phrases: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(phrases) + f" in {rng.randint(1990, 2024)}." for _ in range(12)) for _ in range(n)]


def write_split(run: Path, source: str, split: str, docs: list[str], n_files: int = 2) -> None:
    """The `domainlm prepare` contract: data/<source>/<split>/*.jsonl.gz, one {"text": ...} per line."""
    folder = run / "data" / source / split
    folder.mkdir(parents=True, exist_ok=True)
    (run / "data" / "stats.json").write_text("{}")  # prepare's "complete" marker
    for i in range(n_files):
        with gzip.open(folder / f"{i:05d}.jsonl.gz", "wt", encoding="utf-8") as f:
            for d in docs[i::n_files]:
                f.write(json.dumps({"text": d}) + "\n")


def make_run(tmp_path: Path, *, kind: str = "bpe", vocab_size: int = 400, prepared: bool = True) -> Path:
    run = tmp_path / "run"
    cfg = {
        "name": "t",
        "run_dir": str(run),
        "sources": [{"name": "legal", "role": "domain", "weight": 0.5, "input": "legal/*.txt"},
                    {"name": "news", "role": "general", "weight": 0.5, "input": "news/*.txt"}],
        "tokenizer": {"kind": kind, "vocab_size": vocab_size, "domain_terms": TERMS, "sample_bytes": 200_000},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if prepared:
        write_split(run, "legal", "train", _docs(LEGAL, 200, 1))
        write_split(run, "legal", "val", _docs(LEGAL, 20, 2))
        write_split(run, "news", "train", _docs(NEWS, 200, 3))
        write_split(run, "news", "val", _docs(NEWS, 20, 4))
    return path


def test_bpe_trains_saves_hf_and_audits(tmp_path):
    from transformers import AutoTokenizer

    cfg_path = make_run(tmp_path)
    a = run_tokenizer(cfg_path)
    out = tmp_path / "run" / "tokenizer"
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", AUDIT_FILE} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / AUDIT_FILE).read_text()) == a

    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<s>", "</s>", "<pad>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert a["special_tokens"] == {"<s>": 0, "</s>": 1, "<pad>": 2}
    text = "The licensee paid 12345 € on 2024-03-01 — naïve 日本 text.\n\tnotwithstanding  "
    ids = hf(text)["input_ids"]
    assert 0 not in ids and 1 not in ids  # no BOS/EOS added on encode: prepare adds EOS itself
    assert hf.decode(ids) == text
    # digits are split one by one (BloombergGPT)
    assert [t for t in hf.tokenize(" 12345") if t.strip("Ġ")] == ["1", "2", "3", "4", "5"]

    # audit numbers are consistent with themselves and show the domain gain on this constructed example
    for row in a["bytes_per_token"].values():
        assert row["bytes_per_token"] == pytest.approx(row["val_bytes"] / row["tokens"], abs=1e-4)
        assert row["baseline_bytes_per_token"] == pytest.approx(row["val_bytes"] / row["baseline_tokens"], abs=1e-4)
    legal = a["bytes_per_token"]["legal"]
    assert legal["bytes_per_token"] > legal["baseline_bytes_per_token"]
    assert a["summary"]["domain"]["gain_pct"] > 10
    assert a["summary"]["domain"]["gain_pct"] == legal["gain_pct"]
    assert [t["term"] for t in a["domain_terms"]] == TERMS
    for t in a["domain_terms"]:
        assert "".join(t["tokens"]) == " " + t["term"] == "".join(t["baseline_tokens"])
        assert t["count"] == len(t["tokens"])
    assert sum(t["count"] for t in a["domain_terms"]) < sum(t["baseline_count"] for t in a["domain_terms"])
    assert a["baseline"]["sources"] == ["news"]
    # mixture sampling: equal weights → about equal bytes from each source
    s = a["sample"]
    assert s["legal"]["sampled_bytes"] == pytest.approx(100_000, rel=0.2)
    assert s["news"]["sampled_bytes"] == pytest.approx(100_000, rel=0.2)


def test_rerun_is_noop_and_data_change_retrains(tmp_path):
    cfg_path = make_run(tmp_path)
    first = run_tokenizer(cfg_path)
    tok_json = tmp_path / "run" / "tokenizer" / "tokenizer.json"
    mtime = tok_json.stat().st_mtime_ns
    again = run_tokenizer(cfg_path)
    assert again["skipped"] is True and tok_json.stat().st_mtime_ns == mtime
    assert {k: v for k, v in again.items() if k != "skipped"} == first

    write_split(tmp_path / "run", "legal", "train", _docs(LEGAL, 150, 9))
    assert "skipped" not in run_tokenizer(cfg_path)
    assert not list((tmp_path / "run").glob(".tokenizer.tmp-*"))


def test_failed_run_leaves_previous_tokenizer_intact(tmp_path, monkeypatch):
    import domainlm.tokenizer as T

    cfg_path = make_run(tmp_path)
    run_tokenizer(cfg_path)
    out = RunDir(tmp_path / "run").tokenizer
    before = (out / "tokenizer.json").read_bytes()
    write_split(tmp_path / "run", "legal", "train", _docs(LEGAL, 150, 9))  # forces a retrain

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "audit", killed)
    with pytest.raises(KeyboardInterrupt):
        run_tokenizer(cfg_path)
    assert (out / "tokenizer.json").read_bytes() == before
    assert set(p.name for p in out.iterdir()) >= {"tokenizer.json", AUDIT_FILE}


def test_unigram_option(tmp_path):
    from transformers import AutoTokenizer

    a = run_tokenizer(make_run(tmp_path, kind="unigram", vocab_size=600))
    assert a["kind"] == "unigram" and a["special_tokens"] == {"<s>": 0, "</s>": 1, "<pad>": 2}
    tj = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "Unigram"
    hf = AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    text = "Res judicata applies; 98 765 ünicode."
    assert hf.decode(hf(text)["input_ids"]) == text
    assert [t for t in hf.tokenize(" 987") if t.strip("Ġ")] == ["9", "8", "7"]
    assert a["summary"]["domain"]["gain_pct"] > 0


def test_sampling_is_deterministic_and_weighted(tmp_path):
    run = tmp_path / "run"
    write_split(run, "big", "train", ["x" * 100] * 100)  # 10,000 bytes
    write_split(run, "small", "train", ["y" * 100] * 10)  # 1,000 bytes: repeated to reach its share
    totals = {n: train_bytes(run, n) for n in ("big", "small")}
    weights = {"big": 0.75, "small": 0.25}
    stats: dict = {}
    one = list(sample_texts(run, weights, totals, 8000, 0, stats))
    assert one == list(sample_texts(run, weights, totals, 8000, 0, {}))
    assert one != list(sample_texts(run, weights, totals, 8000, 1, {}))
    assert stats["big"]["sampled_bytes"] == pytest.approx(6000, rel=0.25)
    assert stats["small"]["sampled_bytes"] == 2000  # exactly two copies of every document


def test_vocab_too_small(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size: must be at least 259"):
        load_config(make_run(tmp_path, vocab_size=258, prepared=False))
    load_config(make_run(tmp_path, vocab_size=259, prepared=False))


def test_no_prepared_data(tmp_path):
    cfg_path = make_run(tmp_path, prepared=False)
    with pytest.raises(UserError, match=r"data/stats.json: no prepared data; run `domainlm prepare .*cfg.yaml` first"):
        run_tokenizer(cfg_path)
    write_split(tmp_path / "run", "news", "train", ["some text"])  # prepared, but not the legal source
    with pytest.raises(UserError, match=r"data/legal/train: no prepared data for source 'legal'; run `domainlm prep"):
        run_tokenizer(cfg_path)


def test_empty_train_split(tmp_path):
    cfg_path = make_run(tmp_path)
    for p in (tmp_path / "run" / "data" / "news" / "train").iterdir():
        p.unlink()
    write_split(tmp_path / "run", "news", "train", [])
    with pytest.raises(UserError, match=r"news/train: source 'news' has an empty train split"):
        run_tokenizer(cfg_path)
    assert not RunDir(tmp_path / "run").tokenizer.exists()


def test_cli_json_and_error(tmp_path, capsys):
    cfg_path = make_run(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["tokenizer", str(cfg_path), "--json"])
    assert e.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["domain"]["gain_pct"] > 0

    with pytest.raises(SystemExit) as e:
        cli.main(["tokenizer", str(make_run(tmp_path / "other", prepared=False))])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "domainlm prepare" in err and len(err.strip().splitlines()) == 1
