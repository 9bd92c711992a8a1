"""Corpus preparation: sources → cleaned, deduplicated, split documents → token files."""
