"""Display names of the analyses' methods, degradation inputs and filter sets: one home for the words
the report, the figures, the demo and the reproduction print, so they cannot drift apart."""
from __future__ import annotations

__all__ = ["METHOD_NAMES", "INPUT_NAMES", "FILTER_SET_NAMES", "method_name", "input_name", "filter_set_name"]

#: ranking method → display name
METHOD_NAMES = {"faig": "FAIG", "ig": "IG", "weight_change": "|θ−θ̄|", "random": "random"}
#: degradation label of an input → adjective ("blurry input")
INPUT_NAMES = {"blur": "blurry", "noise": "noisy", "clean": "clean"}
#: degradation label of a filter set → the function those filters carry ("deblurring filters")
FILTER_SET_NAMES = {"blur": "deblurring", "noise": "denoising"}


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def method_name(method: str, *, markdown: bool = False, capital: bool = False) -> str:
    """``"FAIG"``, ``"IG"``, ``"|θ−θ̄|"``, ``"random"``; ``markdown`` escapes ``|`` for table cells."""
    name = METHOD_NAMES.get(method, method)
    if capital:
        name = _capitalize(name)
    return name.replace("|", "\\|") if markdown else name


def input_name(label: str, *, capital: bool = False, noun: bool = False) -> str:
    """``"blurry"`` (``noun``: ``"blurry input"``; ``capital``: ``"Blurry"``) for a degradation label."""
    name = INPUT_NAMES.get(label, label) + (" input" if noun else "")
    return _capitalize(name) if capital else name


def filter_set_name(label: str) -> str:
    """``"deblurring"`` / ``"denoising"`` for the filter set of a degradation label."""
    return FILTER_SET_NAMES.get(label, label)
