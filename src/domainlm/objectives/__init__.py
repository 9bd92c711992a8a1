"""Pretraining objectives (``model.objective``): one `Objective` per file, one line each in the registry below.

- ``causal`` (causal.py): a Llama decoder, next-token prediction — the default.
- ``masked`` (masked.py): a ModernBERT encoder, masked LM (Devlin et al. 2019; Warner et al. 2024).
- ``span`` (span.py): a T5 encoder-decoder, span corruption (Raffel et al. 2020).

Adding one: a module with a frozen dataclass subclassing `Objective` (base.py: its model, tokens, batches, loss,
metric, FLOPs, export class, plan notes) and a `register` line here. Its ``model.*`` settings are its dataclass
fields, read from the config section of the same names.
"""

from __future__ import annotations

from domainlm.errors import UserError
from domainlm.objectives.base import Batches, Loss, Objective
from domainlm.objectives.causal import Causal
from domainlm.objectives.masked import Masked
from domainlm.objectives.span import Span

__all__ = ["DEFAULT", "OBJECTIVES", "Batches", "Causal", "Loss", "Masked", "Objective", "Span", "from_config", "get",
           "of_hf_config", "register"]

OBJECTIVES: dict[str, Objective] = {}  # model.objective → the objective with its default settings
DEFAULT = "causal"  # model.objective's default; also every model folder no other objective claims


def register(objective: Objective) -> Objective:
    OBJECTIVES[objective.name] = objective
    return objective


register(Causal())
register(Masked())
register(Span())


def get(name: str) -> Objective:
    """The registered objective ``name`` with its default settings."""
    if name not in OBJECTIVES:
        raise UserError(f"model.objective: unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def from_config(model_cfg) -> Objective:
    """The objective of a config's ``model`` section, with its settings (model.mask_rate, …)."""
    return get(model_cfg.objective).configured(model_cfg)


def of_hf_config(hf_config) -> Objective:
    """The objective a Hugging Face model config was trained with: the first that claims it (an encoder-decoder,
    a masked-LM head), else the default (any other model is a causal LM)."""
    return next((o for o in OBJECTIVES.values() if o.claims(hf_config)), OBJECTIVES[DEFAULT])
