"""Ray for real: `domainlm prepare` with ``executor: ray`` on a local Ray (``ray.init(num_cpus=2)``) writes the
same bytes as the local executor (``pip install domainlm[ray]``; `make test` installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from domainlm.data.command import run_prepare
from test_prepare import quiet_console, write_config, write_texts

ray = pytest.importorskip("ray", reason="pip install 'domainlm[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def tree(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "data").rglob("*")) if p.is_file()}


def test_prepare_on_ray_matches_local(local_ray, tmp_path):
    docs = write_texts(tmp_path / "a", 40, seed=1)
    (tmp_path / "a" / "copy.txt").write_text(docs[0])  # an exact duplicate for the dedup stages to find
    srcs = [{"name": "a", "role": "domain", "weight": 1.0, "input": str(tmp_path / "a")}]
    local = write_config(tmp_path, srcs, tasks=2, minhash_buckets=2)
    want = run_prepare(local, quiet_console())["stats"]
    on_ray = tmp_path / "ray.yaml"
    data = yaml.safe_load(local.read_text())
    data["run_dir"] = str(tmp_path / "run-ray")
    data["prepare"]["executor"] = "ray"
    on_ray.write_text(yaml.safe_dump(data))
    got = run_prepare(on_ray, quiet_console())["stats"]
    assert got == want and got["sources"]["a"]["drops"]["exact_duplicate"] == 1
    assert tree(tmp_path / "run-ray") == tree(tmp_path / "run")
    # the tasks ran in Ray workers: datatrove's Ray executor marked every task of every stage complete
    clean = tmp_path / "run-ray" / ".prepare" / "a" / "stages" / "clean"
    assert len(list((clean / "completions").iterdir())) == 2 and ray.is_initialized()


def test_mine_on_ray_matches_local(local_ray, tmp_path):
    """`domainlm mine` with ``executor: ray``: the same mined source and mine.json as the local executor."""
    import crashkit
    from domainlm.mine.command import run_mine
    from test_mine import config, copy_run, make_corpora

    make_corpora(tmp_path)
    run_prepare(config(tmp_path, rounds=1), quiet_console())
    copy_run(tmp_path, "run-ray")
    want = run_mine(config(tmp_path, rounds=1), quiet_console())["mine"]  # one round: two Ray stages, not three
    got = run_mine(config(tmp_path, "run-ray", executor="ray", rounds=1), quiet_console())["mine"]
    assert got == want and got["docs"] > 0
    assert crashkit.tree(tmp_path / "run-ray", "mine") == crashkit.tree(tmp_path / "run", "mine")
    scored = tmp_path / "run-ray" / ".mine" / "round-1" / "stages" / "web" / "completions"
    assert len(list(scored.iterdir())) == 2 and ray.is_initialized()
