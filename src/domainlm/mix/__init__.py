"""`domainlm mix`: the domain weight chosen by a fitted mixing law (law.py) over small runs (stage.py)."""
