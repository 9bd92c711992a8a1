"""`domainlm prepare`: layout, statistics, dedup, split, tokens, determinism, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from domainlm.config import load_config
from domainlm.data import pipeline, tokens
from domainlm.data.command import run_prepare
from domainlm.data.tokenize import tokenize
from domainlm.errors import ConfigError, UserError
from domainlm.rundir import RunDir
from domainlm.tokenize import run_tokenize

WORDS = ("licensor grants licensee a perpetual worldwide royalty free license to use copy modify merge publish "
         "distribute sublicense warranty liability damages contract consideration court appeal statute party "
         "agreement notice term termination breach remedy indemnify jurisdiction clause section").split()


def make_doc(rng: random.Random, n_words: int = 80) -> str:
    lines = []
    for _ in range(n_words // 10):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(10)))
    return "\n".join(lines) + "\n"


def write_texts(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = [make_doc(rng) for _ in range(n)]
    for i, d in enumerate(docs):
        (folder / f"doc{i:04d}.txt").write_text(d)
    return docs


def write_config(tmp: Path, sources: list[dict], **prepare) -> Path:
    cfg = {"name": "t", "run_dir": str(tmp / "run"), "sources": sources,
           "prepare": {"workers": 2, **prepare}}
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def two_sources(tmp: Path, n: int = 60) -> Path:
    write_texts(tmp / "a", n, seed=1)
    write_texts(tmp / "b", n, seed=2)
    return write_config(tmp, [
        {"name": "a", "role": "domain", "weight": 0.5, "input": str(tmp / "a")},
        {"name": "b", "role": "general", "weight": 0.5, "input": str(tmp / "b") + "/*.txt"},
    ])


def quiet_console():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))  # noqa: SIM115


def read_split(run: Path, source: str, split: str) -> list[dict]:
    return list(pipeline.iter_records(run, source, split))


def train_tokenizer(run: Path, texts: list[str]) -> None:
    """A tiny byte-level BPE with </s>, saved the way `domainlm tokenizer` saves (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    (run / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(run / "tokenizer" / "tokenizer.json"))
    (run / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


# ------------------------------------------------------------------------------------------- happy path


def test_prepare_layout_stats_split_and_dedup(tmp_path):
    docs = write_texts(tmp_path / "a", 80, seed=1)
    (tmp_path / "a" / "copy.txt").write_text(docs[0])  # exact duplicate
    near = docs[1].split("\n")
    near[0] = "completely different first line here"
    (tmp_path / "a" / "near.txt").write_text("\n".join(near))  # near duplicate: one line of eight changed
    (tmp_path / "a" / "short.txt").write_text("too short")
    (tmp_path / "a" / "rep.txt").write_text("the same line again\n" * 20)
    jl = tmp_path / "b.jsonl"
    jl.write_text("".join(json.dumps({"body": d, "id": f"b{i}"}) + "\n" for i, d in enumerate(write_texts(
        tmp_path / "bsrc", 50, seed=3))))
    cfg = write_config(tmp_path, [
        {"name": "a", "role": "domain", "weight": 0.51, "input": str(tmp_path / "a")},
        {"name": "b", "role": "general", "weight": 0.49, "input": str(jl), "text_key": "body"},
    ])
    result = run_prepare(cfg, quiet_console())
    run = tmp_path / "run"
    s = json.loads((run / "data" / "stats.json").read_text())["sources"]
    assert s["a"]["docs_in"] == 84
    assert s["a"]["drops"]["exact_duplicate"] == 1
    assert s["a"]["drops"]["near_duplicate"] == 1
    assert s["a"]["drops"]["too_short"] == 1
    assert s["a"]["drops"]["repetition"] == 1
    assert s["a"]["docs_out"] == 80
    assert s["b"]["docs_out"] == 50 and s["b"]["docs_in"] == 50
    # val: at least 20 docs and 1% of the documents, disjoint from train
    for name in ("a", "b"):
        train, val = read_split(run, name, "train"), read_split(run, name, "val")
        assert len(val) == s[name]["val_docs"] == 20 and len(train) == s[name]["docs_out"] - 20
        assert not {d["id"] for d in train} & {d["id"] for d in val}
        assert all(set(d) >= {"id", "text", "metadata"} for d in train)
    files = sorted((run / "data" / "a" / "train").iterdir())
    assert [f.name for f in files] == ["00000.jsonl.gz", "00001.jsonl.gz"]
    assert result["stats"]["sources"]["a"]["bytes_out"] == sum(
        len(t.encode()) for sp in ("train", "val") for t in pipeline.iter_documents(run, "a", sp))
    # a rerun is a no-op: same statistics, no output file rewritten, no datatrove task rerun
    from crashkit import stamps

    before = stamps(run, "data", ".prepare")
    assert run_prepare(cfg, quiet_console())["stats"] == result["stats"]
    assert stamps(run, "data", ".prepare") == before


def test_tokenize_writes_contract_files(tmp_path):
    cfg = two_sources(tmp_path, 50)
    run = tmp_path / "run"
    assert run_prepare(cfg, quiet_console())["next"] == "domainlm tokenizer"
    with pytest.raises(UserError, match=r"tokenizer.json: no tokenizer; run `domainlm tokenizer CONFIG` first"):
        run_tokenize(cfg, quiet_console())
    train_tokenizer(run, list(pipeline.iter_documents(run, "a", "train")))
    assert run_prepare(cfg, quiet_console())["next"] == "domainlm tokenize"  # a hint: prepare only prepares
    assert not (run / "tokens").exists()
    result = run_tokenize(cfg, quiet_console())
    counts = tokens.load_counts(run)
    assert result["counts"] == counts and counts["dtype"] == "uint16"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    assert counts["eos_id"] == eos
    for name in ("a", "b"):
        for split in ("train", "val"):
            arr = tokens.open_tokens(run, name, split, counts)
            texts = list(pipeline.iter_documents(run, name, split))
            expected = []
            for t in texts:
                expected += tok.encode(t, add_special_tokens=False).ids + [eos]
            assert arr.tolist() == expected  # EOS after every document, file order
            c = counts["sources"][name]
            assert c[f"{split}_tokens"] == len(expected) and c[f"{split}_docs"] == len(texts)
            assert c[f"{split}_bytes"] == sum(len(t.encode()) for t in texts)
    assert not (run / "tokens" / "a" / ".parts").exists()

    # Another tokenizer (a base model's, for continued pretraining) gets its own token folder and stage marker;
    # the run's own token files are not touched.
    from crashkit import stamps

    other = tmp_path / "base-model"
    other.mkdir()
    shutil.copy(run / "tokenizer" / "tokenizer_config.json", other)
    tok.add_tokens(["zzqx"])  # a different tokenizer.json, the same ids for the text (it has no "zzqx")
    tok.save(str(other / "tokenizer.json"))
    before = stamps(run, "tokens")
    folder = RunDir(run).tokens_for(other)
    sha = hashlib.sha256((other / "tokenizer.json").read_bytes()).hexdigest()
    assert folder == run / f"tokens-{sha[:12]}" and RunDir(run).tokens_for(run / "tokenizer") == run / "tokens"
    theirs = tokenize(run, other)
    assert theirs == tokens.load_counts(folder) and theirs["tokenizer_sha256"] == sha
    assert theirs["vocab_size"] == counts["vocab_size"] + 1 and theirs["sources"] == counts["sources"]
    assert tokens.open_tokens(folder, "a", "val", theirs).tolist() == tokens.open_tokens(run, "a", "val").tolist()
    assert stamps(run, "tokens") == before and (run / ".stages" / f"tokenize-{sha[:12]}.json").exists()
    assert tokenize(run, other) == theirs  # done already


def test_jsonl_variants_parquet_and_hf(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(5)
    docs = [make_doc(rng) for _ in range(45)]
    lines = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "x.jsonl.gz").write_bytes(gzip.compress(lines[: len(lines) // 2].rsplit(b"\n", 1)[0] + b"\n"))
    (tmp_path / "j" / "y.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b"\n".join(lines.split(b"\n")[lines[: len(lines) // 2].rsplit(b"\n", 1)[0].count(b"\n") + 1:])))
    pq.write_table(pa.table({"content": docs}), tmp_path / "p.parquet")
    import datasets

    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "hfds"))
    cfg = write_config(tmp_path, [
        {"name": "j", "role": "domain", "weight": 0.4, "input": str(tmp_path / "j")},
        {"name": "p", "role": "general", "weight": 0.3, "input": str(tmp_path / "p.parquet"), "text_column": "content"},
        {"name": "h", "role": "general", "weight": 0.3, "input": f"hf:{tmp_path / 'hfds'}", "text_column": "content"},
    ])
    s = run_prepare(cfg, quiet_console())["stats"]["sources"]
    for name in ("j", "p", "h"):
        assert s[name]["docs_in"] == 45 and s[name]["docs_out"] == 45, (name, s[name])


def test_packaged_corpora_readers():
    from collections import Counter

    from domainlm.config import SourceConfig
    from domainlm.data import sources

    lic = sources.resolve(SourceConfig(name="legal", role="domain", weight=1, input="package:licensedcode"), "x")
    assert len(lic.files) > 30_000
    counts, errors = Counter(), []
    first = next(sources.read(lic, 0, 1000, counts, errors))
    assert not first.text.startswith("---") and first.metadata["kind"] == "license"
    assert {"category", "short_name", "spdx_license_key"} <= set(first.metadata)
    bbc = sources.resolve(SourceConfig(name="news", role="general", weight=1, input="package:bbc-news"), "x")
    assert len(bbc.files) == 2225
    docs = list(sources.read(bbc, 0, 1, counts, errors))
    assert len(docs) == 2225 and not any("\ufffd" in d.text for d in docs)  # the Latin-1 file decodes cleanly
    assert {d.metadata["category"] for d in docs} == {"business", "entertainment", "politics", "sports", "tech"}


# ------------------------------------------------------------------------------------------- bad input


def test_missing_path_and_empty_glob(tmp_path):
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "nope")}])
    with pytest.raises(UserError, match=r"sources\[0\].input: path .*nope.* does not exist"):
        run_prepare(cfg, quiet_console())
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "*.txt")}])
    with pytest.raises(UserError, match=r"glob .* matched no files"):
        run_prepare(cfg, quiet_console())


def test_empty_after_filtering_names_source_and_reasons(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.txt").write_text("tiny")
    (tmp_path / "a" / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "a")}])
    with pytest.raises(UserError, match=r"source 'a': no documents left after filtering .*binary 1, too_short 3"):
        run_prepare(cfg, quiet_console())
    assert not (tmp_path / "run" / "data" / "stats.json").exists()


def test_invalid_utf8_binary_and_huge_line(tmp_path):
    write_texts(tmp_path / "a", 45)
    (tmp_path / "a" / "latin.txt").write_bytes(("caf\xe9 " * 20 + "\n").encode("latin-1") + make_doc(
        random.Random(9)).encode())
    (tmp_path / "a" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)) * 20)
    (tmp_path / "a" / "huge.txt").write_bytes(b"x" * (50 * 2**20))  # a single 50 MB line
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "a")}],
                       max_chars=1_000_000)
    s = run_prepare(cfg, quiet_console())["stats"]["sources"]["a"]
    assert s["invalid_utf8_replaced"] == 1 and s["drops"]["binary"] == 1 and s["drops"]["too_long"] == 1
    assert s["docs_out"] == 46
    texts = [t for sp in ("train", "val") for t in pipeline.iter_documents(tmp_path / "run", "a", sp)]
    assert sum("caf\ufffd" in t for t in texts) == 1


def test_huge_jsonl_line_is_streamed(tmp_path):
    rng = random.Random(3)
    rows = [json.dumps({"text": make_doc(rng)}) for _ in range(45)]
    rows.insert(10, json.dumps({"text": "y " * (25 * 2**20)}))  # one 50 MB line
    (tmp_path / "big.jsonl").write_text("\n".join(rows) + "\n")
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "big.jsonl")}],
                       max_chars=1_000_000)
    s = run_prepare(cfg, quiet_console())["stats"]["sources"]["a"]
    assert s["drops"]["too_long"] == 1 and s["docs_out"] == 45


def test_malformed_jsonl_counted_then_fatal_above_rate(tmp_path):
    rng = random.Random(4)
    rows = [json.dumps({"text": make_doc(rng)}) for _ in range(60)]
    rows[7] = '{"text": "broken'
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(rows) + "\n")
    src = [{"name": "a", "role": "domain", "weight": 1, "input": str(path)}]
    s = run_prepare(write_config(tmp_path, src, max_error_rate=0.05), quiet_console())["stats"]["sources"]["a"]
    assert s["drops"]["malformed_json"] == 1 and s["malformed_at"] == [f"{path}:8"] and s["docs_out"] == 59
    rows[9] = "not json at all"
    rows[11] = json.dumps({"other": "no text key"})
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=rf"3 of 60 JSONL lines malformed .*first at {path}:8.*max_error_rate=0.01"):
        run_prepare(write_config(tmp_path, src, max_error_rate=0.01), quiet_console())


def test_missing_text_key_and_column(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "c.jsonl")}])
    with pytest.raises(UserError, match=r"c.jsonl:1: no text key 'text' \(found: body\); set sources\[0\].text_key"):
        run_prepare(cfg, quiet_console())
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "p.parquet")}])
    with pytest.raises(UserError, match=r"p.parquet: no text column 'text' \(found: body\)"):
        run_prepare(cfg, quiet_console())


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([("a", 0.5), ("b", 0.4)], r"sources: weights must sum to 1, got 0.9"),
        ([("a", 1.2), ("b", -0.2)], r"sources\[0\].weight: .*less than or equal to 1"),
        ([("a", 1.2), ("b", -0.2)], r"sources\[1\].weight: .*greater than or equal to 0"),
        ([("a", 0.5), ("a", 0.5)], r"two sources named 'a'"),
    ],
)
def test_bad_weights_and_duplicate_names(tmp_path, sources, message):
    cfg = write_config(tmp_path, [{"name": n, "role": "domain", "weight": w, "input": "x"} for n, w in sources])
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert any(re.search(message, p) for p in e.value.problems), e.value.problems


def test_cli_one_line_error_exit_2(tmp_path):
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": str(tmp_path / "nope")}])
    r = subprocess.run([sys.executable, "-m", "domainlm", "prepare", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


# ------------------------------------------------------------------------------------------- resume


def test_own_folder_recipe_runs(tmp_path):
    from domainlm.config import demo_recipe_path

    recipe = demo_recipe_path().parent / "own-folder.yaml"
    data = yaml.safe_load(recipe.read_text())
    (tmp_path / "my-corpus" / "sub").mkdir(parents=True)
    rng = random.Random(7)
    for i in range(45):
        (tmp_path / "my-corpus" / ("sub" if i % 2 else "") / f"{i}.md").write_text(make_doc(rng, 60))
    data["run_dir"] = str(tmp_path / "run")
    data["prepare"]["workers"] = 2
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(data))  # same relative input: my-corpus/
    s = run_prepare(tmp_path / "own.yaml", quiet_console())["stats"]["sources"]
    assert s["mydomain"]["docs_out"] == 45 and s["news"]["docs_in"] == 2225
    assert load_config(demo_recipe_path()).sources[0].input == "package:licensedcode"


def test_second_prepare_on_same_run_dir_is_refused(tmp_path):
    import fcntl

    cfg = two_sources(tmp_path, 45)
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as a running `domainlm prepare` holds it
        f.write("prepare 4242\n")
        f.flush()
        with pytest.raises(UserError, match=r"another `domainlm prepare` \(pid 4242\) is running"):
            run_prepare(cfg, quiet_console())
    assert run_prepare(cfg, quiet_console())["stats"]["sources"]["a"]["docs_out"] == 45


def test_hf_missing_column_and_missing_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": f"hf:{tmp_path / 'ds'}"}])
    with pytest.raises(UserError, match=r"sources\[0\].input: dataset .* has no text column 'text' \(found: body\)"):
        run_prepare(cfg, quiet_console())
    cfg = write_config(tmp_path, [{"name": "a", "role": "domain", "weight": 1, "input": f"hf:{tmp_path / 'no'}"}])
    with pytest.raises(UserError, match=r"sources\[0\].input: dataset folder .* does not exist"):
        run_prepare(cfg, quiet_console())
