"""Corpus-scale inputs stream: an ``hf:`` source is read as a stream of its files, sharded across prepare's
tasks, and ``max_docs`` / ``max_bytes`` take a slice of it. Offline, on a local dataset folder of parquet shards
much larger than the slice: what is read is counted (bytes the process read from disk, documents), not timed."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import yaml

from domainlm.config import SourceConfig, load_config
from domainlm.data import sources
from domainlm.data.command import run_prepare
from domainlm.errors import ConfigError
from test_prepare import quiet_console, write_config

SHARDS, ROWS, ROW_GROUP = 8, 1000, 50


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """A hub-style dataset folder: data/train-0000k-of-00008.parquet, ~1 KB of distinct text per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("web") / "web"
    (root / "data").mkdir(parents=True)
    rng = random.Random(0)
    texts = []
    for k in range(SHARDS):
        # random hex words: parquet cannot compress them much, so the files are about as large as the text
        rows = [f"web page {k}-{i}\n" + "\n".join(" ".join(f"{rng.getrandbits(32):08x}" for _ in range(9))
                                                   for _ in range(12)) for i in range(ROWS)]
        pq.write_table(pa.table({"text": rows, "url": [f"https://example.com/{k}/{i}" for i in range(ROWS)]}),
                       root / "data" / f"train-{k:05d}-of-{SHARDS:05d}.parquet", row_group_size=ROW_GROUP)
        texts.append(rows)
    return root, texts


def spec_for(root: Path, **slice_) -> sources.SourceSpec:
    src = SourceConfig(name="web", role="general", weight=1.0, input=f"hf:{root}", **slice_)
    return sources.resolve(src, "sources[0].input")


def test_stream_is_sharded_by_file_and_sliced(corpus):
    root, texts = corpus
    spec = spec_for(root, max_docs=301)
    got = {}
    for rank in range(2):
        counts = Counter()
        got[rank] = [d.text for d in sources.read(spec, rank, 2, counts, [])]
        assert counts["docs_in"] == len(got[rank])
    # 301 = 150 + 151; task 0 streams files 0-3, task 1 files 4-7, each from its first row
    assert got[0] == texts[0][:150] and got[1] == texts[4][:151]
    # a byte budget: the documents of a task stop at the first that reaches its share (half of it here)
    spec = spec_for(root, max_bytes=100_000)
    docs = list(sources.read(spec, 1, 2, Counter(), []))
    sizes = [d.raw_bytes for d in docs]
    assert [d.text for d in docs] == texts[4][: len(docs)]
    assert sum(sizes) >= 50_000 > sum(sizes[:-1])
    # without a slice every row of the task's files is read, in file order
    assert [d.text for d in sources.read(spec_for(root), 1, 2, Counter(), [])] == sum(texts[4:], [])


def test_slice_reads_a_slice_of_the_files_in_bounded_memory(corpus, tmp_path):
    """In a fresh process: the bytes it reads (/proc/self/io rchar counts every read() call) while taking 300
    documents of 8000 are a small part of the corpus, and its peak memory (ru_maxrss), once one file has been
    streamed, does not grow while it streams the other seven. Imports are paid first, on another (tiny)
    dataset, so no cache can help."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _ = corpus
    (tmp_path / "tiny" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["warm up"] * 3}), tmp_path / "tiny" / "data" / "train.parquet")
    on_disk = sum(f.stat().st_size for f in (root / "data").iterdir())
    script = textwrap.dedent(f"""
        import json, resource
        from collections import Counter
        from domainlm.config import SourceConfig
        from domainlm.data import sources

        def io():
            rchar = int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])
            return rchar, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        def take(folder, **slice_):
            src = SourceConfig(name="web", role="general", weight=1.0, input="hf:" + folder, **slice_)
            spec = sources.resolve(src, "sources[0].input")
            return sum(d.raw_bytes for d in sources.read(spec, 0, 1, Counter(), []))

        take("{tmp_path / 'tiny'}", max_docs=1)
        r0, m0 = io()
        text = take("{root}", max_docs=300)
        r1, m1 = io()
        everything = take("{root}")
        r2, m2 = io()
        print(json.dumps({{"read": r1 - r0, "text": text, "all_read": r2 - r1, "all_text": everything,
                          "grew": m2 - m1}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                            "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert 300 * 900 < m["text"] < 300 * 1200 and m["all_text"] > 8000 * 900
    assert m["all_read"] >= on_disk  # the yardstick: streaming everything reads every file
    # 300 rows are in the first file; a stream reads a parquet file's row groups together (pyarrow pre-buffers
    # them), so the unit read is a file: less than two of the eight files were read
    assert m["read"] < 2 * on_disk / SHARDS
    # measured: ~8 MB of buffers and allocator pools for the first file, then flat (+0.3 MB for 7 more files)
    assert m["grew"] < m["all_text"] / 4


def test_prepare_takes_the_slice_across_tasks(corpus, tmp_path):
    root, texts = corpus
    cfg = write_config(tmp_path, [{"name": "web", "role": "general", "weight": 1.0, "input": f"hf:{root}",
                                   "max_docs": 400}], tasks=2)
    stats = run_prepare(cfg, quiet_console())["stats"]["sources"]["web"]
    assert stats["docs_in"] == 400 and stats["docs_out"] == 400
    assert stats["bytes_in"] == sum(len(t.encode()) for t in texts[0][:200] + texts[4][:200])


def test_slice_keys_are_typed_and_validated(tmp_path):
    p = tmp_path / "c.yaml"
    base = {"name": "t", "sources": [{"name": "web", "role": "general", "weight": 1.0, "input": "hf:x/y"}]}
    base["sources"][0]["max_bytes"] = 2e11  # "50B tokens" at ~4 bytes/token, as YAML writes it
    p.write_text(yaml.safe_dump(base))
    assert load_config(p).sources[0].max_bytes == 200_000_000_000
    for written, value in (("2e11", 200_000_000_000), ("200G", 200_000_000_000), ("1.5M", 1_500_000)):
        p.write_text(yaml.safe_dump(base).replace("200000000000.0", written))
        assert load_config(p).sources[0].max_bytes == value
    base["sources"][0].update(max_bytes=None, max_docs=0)
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=r"sources\[0\]\.max_docs: .*greater than or equal to 1"):
        load_config(p)
    p.write_text(yaml.safe_dump(base).replace("max_docs: 0", "max_docs: lots"))
    with pytest.raises(ConfigError, match=r"sources\[0\]\.max_docs: expected a whole number like"):
        load_config(p)


def test_slice_applies_to_local_files_too(tmp_path):
    from domainlm.config import PrepareConfig
    from domainlm.data.pipeline import source_fingerprint

    lines = [json.dumps({"text": f"record {i} " * 10}) for i in range(100)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    src = SourceConfig(name="a", role="domain", weight=1.0, input=str(tmp_path / "a.jsonl"), max_docs=10)
    counts = Counter()
    spec = sources.resolve(src, "sources[0].input")
    docs = list(sources.read(spec, 0, 1, counts, []))
    assert [d.text for d in docs] == [f"record {i} " * 10 for i in range(10)] and counts["docs_in"] == 10
    # another slice is another source: prepare starts it over
    fps = {source_fingerprint(sources.resolve(src.model_copy(update=u), "s"), PrepareConfig(), 1)
           for u in ({}, {"max_docs": 11}, {"max_docs": None}, {"max_docs": None, "max_bytes": 10})}
    assert len(fps) == 4
