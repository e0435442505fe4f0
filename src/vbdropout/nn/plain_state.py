"""A variational layer that also loads a plain layer's state_dict (a pretrained network).

A Gaussian-weight layer's state holds θ (``weight``), the bias and its variance
entry (``log_sigma2`` or ``log_alpha_param``); a plain ``nn.Linear``'s has only
the first two. A plain state_dict loads into the variational twin with the
variance left at its initial value. But only a state_dict without *any*
variational entry is plain: when another layer of the same ``load_state_dict``
call found its variance, every layer whose variance is missing must report it
missing, so that a truncated variational state_dict never loads silently.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["load_plain_or_variational"]


@dataclass
class _LoadRecord:
    """What the variational layers of one ``load_state_dict`` call saw so far."""

    missing_keys: list[str]  # the call's own list: identifies the call
    variational: bool = False  # some layer found its variance entry
    taken_as_plain: list[str] = field(default_factory=list)  # variance keys let go as plain


_LOADING = threading.local()


def _load_record(missing_keys: list[str]) -> _LoadRecord:
    """The record of the load that ``missing_keys`` belongs to (a new one for a new load)."""
    record = getattr(_LOADING, "record", None)
    if record is None or record.missing_keys is not missing_keys:
        record = _LOADING.record = _LoadRecord(missing_keys)
    return record


def load_plain_or_variational(
    state_dict: dict[str, Any], prefix: str, names: Sequence[str], missing_keys: list[str]
) -> bool:
    """Called by a layer's ``_load_from_state_dict`` after torch's: whether the layer
    loaded a plain state (its variance entries ``names`` absent, ``weight`` present,
    and no other layer of the call found its own variance), in which case those
    entries are taken off ``missing_keys`` and the layer should reset its variance.
    """
    absent = [prefix + n for n in names if prefix + n not in state_dict]
    record = _load_record(missing_keys)
    if not absent:
        record.variational = True
        missing_keys.extend(key for key in record.taken_as_plain if key not in missing_keys)
        record.taken_as_plain.clear()
        return False
    if prefix + "weight" in state_dict and not record.variational:
        for key in absent:
            missing_keys.remove(key)
        record.taken_as_plain.extend(absent)
        return True
    return False
