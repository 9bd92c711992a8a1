"""Your own scaling law: an IsoFLOP sweep on your data (sweep.py) and the Chinchilla fits (fit.py)."""
