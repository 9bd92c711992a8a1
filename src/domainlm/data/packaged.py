"""The packaged demo corpora (installed Python packages, read offline): where a package's files are, ScanCode's
front matter, and LicenseDB (licensedcode-data) as labelled licenses with its held-out split by license and the
files of the held-out licenses to keep out of pretraining (``sources[].exclude_ids: licensedb:test``).

Data-level on purpose: `data/sources.py` reads the corpora through it, and `evaluate/tasks.py` builds the
downstream task items on top of it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from domainlm.errors import UserError

TEST_FRACTION = 0.2
VAL_FRACTION = 0.05


def package_dir(dist: str, sub: str) -> Path:
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise UserError(f"package {dist!r} is not installed; run `pip install {dist}` (or `make demo`)") from None
    return Path(str(d.locate_file(sub)))


def split_front_matter(text: str) -> tuple[dict, str]:
    """Split a ScanCode ``---`` YAML front matter from the license text.

    Only top-level ``key: value`` scalars are kept (category, short_name, spdx_license_key, license_expression…):
    a full YAML parse costs ~0.3 ms per file, 10 s for the 37k files of the demo, and lists are not needed."""
    if not text.startswith("---"):
        return {}, text
    end = text.find("\n---", 3)
    if end < 0:
        return {}, text
    meta = {}
    for line in text[3:end].splitlines():
        if not line or line[0] in " \t-#" or ":" not in line:
            continue
        k, _, v = line.partition(":")
        v = v.strip().strip("'\"")
        if v:
            meta[k.strip()] = v
    body = text[end + 4 :]
    return meta, body.lstrip("\n")


@dataclass(frozen=True)
class License:
    key: str
    category: str
    short_name: str
    text: str


def load_licenses() -> list[License]:
    root = package_dir("licensedcode-data", "licensedcode/data") / "licenses"
    out = []
    for p in sorted(root.glob("*.LICENSE")):
        meta, text = split_front_matter(p.read_text(encoding="utf-8", errors="replace"))
        if meta.get("is_deprecated") == "yes" or not text.strip() or not meta.get("category"):
            continue
        out.append(License(meta.get("key", p.stem), meta["category"], meta.get("short_name", p.stem), text))
    if not out:
        raise UserError(f"{root}: no licenses found; reinstall licensedcode-data")
    return out


def split_licenses(licenses: list[License], test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION,
                   seed: int = 0) -> dict[str, str]:
    """license key -> train | val | test, stratified by category (every category with ≥ 2 licenses has test items)."""
    by_cat: dict[str, list[str]] = {}
    for lic in licenses:
        by_cat.setdefault(lic.category, []).append(lic.key)
    split = {}
    for keys in by_cat.values():
        keys = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
        n_test = max(1, round(len(keys) * test_fraction)) if len(keys) >= 2 else 0
        n_val = round(len(keys) * val_fraction)
        for i, k in enumerate(keys):
            split[k] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def excluded_files(test_keys: set[str]) -> list[str]:
    """Files of the licensedcode source to keep out of pretraining: the test licenses' texts, and every rule
    whose license_expression names a test license (rules are fragments and notices of those texts)."""
    root = package_dir("licensedcode-data", "licensedcode/data")
    out = [f"licenses/{k}.LICENSE" for k in sorted(test_keys)]
    for p in sorted((root / "rules").glob("*.RULE")):
        with open(p, encoding="utf-8", errors="replace") as f:
            head = f.read(2048)  # the front matter is at the top
        expr = split_front_matter(head + "\n---")[0].get("license_expression", "")
        if set(re.findall(r"[a-z0-9][a-z0-9.+_-]*", expr.lower())) & test_keys:
            out.append(f"rules/{p.name}")
    return out


@lru_cache(maxsize=1)
def default_test_exclusions() -> tuple[str, ...]:
    """``sources[].exclude_ids: licensedb:test``: the files `write_task_data` lists in exclude_ids.txt for the
    default split."""
    split = split_licenses(load_licenses())
    return tuple(excluded_files({k for k, part in split.items() if part == "test"}))
