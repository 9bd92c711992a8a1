"""domainlm: pretrain your own domain-specific language model from scratch."""

__version__ = "0.1.0"
