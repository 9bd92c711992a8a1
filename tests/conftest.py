import os

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def cli(capsys):
    """Run `domainlm ...` in-process; returns (exit_code, stdout, stderr)."""
    from domainlm.cli import main

    def run(*args: str):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (the only tests allowed to skip under `make test`)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``DOMAINLM_NO_SKIPS=1`` (what `make test` and CI set) a skipped test is a failed one: a skip hides
    a real part (browser, harness, cluster) that did not run. Only tests marked ``gpu`` may skip."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("DOMAINLM_NO_SKIPS") == "1" and item.get_closest_marker("gpu") is None:
        if hasattr(report, "wasxfail"):
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under DOMAINLM_NO_SKIPS=1 (install what it needs: `make test` does): {reason}"
