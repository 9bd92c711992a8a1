"""Check that every JSON file a stage wrote under a folder has a typed model (pipeline.schema_for) and matches it.

The writers' own tests call `check_outputs` on what they produced, so a new JSON output without a model, or a
writer that drifts from its model, fails the test of that writer. Not outputs of domainlm's stages, so not
checked: the Hugging Face formats (model and tokenizer folders), and the bookkeeping no other stage reads
(``.stages/`` markers, ``.prepare/`` work files, token ``.parts/``, checkpoint internals).
"""

from __future__ import annotations

from pathlib import Path

from domainlm.errors import UserError
from domainlm.pipeline import schema_for
from domainlm.rundir import HF_CONFIG, RunDir, load_jsonl, load_output

# Files of the Hugging Face formats (transformers / tokenizers), in model and tokenizer folders.
HF_FILES = {HF_CONFIG, "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "vocab.json", "model.safetensors.index.json", "chat_template.json",
            "baseline-tokenizer.json"}  # the tokenizer audit's general-only baseline, in the tokenizers format
BOOKKEEPING = {RunDir.STAGES, RunDir.PREPARE, RunDir.CHECKPOINTS, ".parts"}


def check_outputs(root: Path) -> dict[str, object]:
    """Every ``*.json`` file and ``points.jsonl`` under ``root`` (bookkeeping and Hugging Face files aside):
    asserts it has a model and loads through it; returns {relative path: loaded}."""
    root = Path(root)
    found: dict[str, object] = {}
    for f in sorted(root.rglob("*.json*")):
        rel = f.relative_to(root).as_posix()
        parts = rel.split("/")
        if not f.is_file() or f.name in HF_FILES or BOOKKEEPING & set(parts) or any(p.startswith(".") for p in parts):
            continue
        if f.suffix == ".jsonl" and f.name != Path(RunDir.POINTS).name:
            continue  # data (documents, task items) and the metrics log's free-form rows
        if f.suffix not in (".json", ".jsonl"):
            continue
        model = schema_for(rel)
        assert model is not None, f"{rel}: a JSON output without a model in outputs.py"
        try:
            loaded = load_jsonl(f, model) if f.suffix == ".jsonl" else load_output(f, model)
        except UserError as e:
            raise AssertionError(str(e)) from None
        assert loaded is not None, rel
        found[rel] = loaded
    return found
