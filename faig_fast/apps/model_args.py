"""How the CLI builds models from ``--arch`` / ``--model-class`` / ``--model-kwargs`` (``faig attribute``
and ``faig lam`` share it)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from torch import nn

from faig_fast.errors import InvalidInputError


def model_loader(args: argparse.Namespace) -> Callable[[str], nn.Module]:
    """``path -> model`` for the checkpoints named on the command line, per ``args.arch``,
    ``args.model_class`` and ``args.model_kwargs`` (a JSON object)."""
    from faig_fast.models import load_model

    kwargs = {}
    if args.model_kwargs is not None:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"--model-kwargs is not valid JSON ({e}): {args.model_kwargs!r}") from e
        if not isinstance(kwargs, dict):
            raise InvalidInputError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    if args.model_class is not None and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: a module in the current folder imports
    return lambda path: load_model(path, args.arch, model_class=args.model_class, model_kwargs=kwargs)
