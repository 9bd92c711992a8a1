"""`domainlm mine`: domain documents mined from general corpora with a classifier (docs/mine.md)."""
