"""`domainlm eval`: the evidence that a domain model is better on its domain.

- ``bpb.py``      bits per byte on each source's val split and on user text (tokenizer-independent)
- ``probes.py``   domain-term cloze probes ranked by log-probability
- ``harness.py``  lm-evaluation-harness on the HF export (optional extra ``[harness]``)
- ``inputs.py``   what eval reads: a run directory or any HF model folder, and the texts to score
- ``command.py``  glue for the CLI: eval.json and the printed table
"""
