"""faig_fast: Filter Attribution based on Integral Gradients (FAIG), fast.

``faig_fast.attribute(model_a, model_b, loader)`` attributes the change from baseline ``model_a``
(θ̄) to target ``model_b`` (θ) to individual conv filters (Xie et al., NeurIPS 2021); ``faig_fast.lam(model, image, window)`` gives the
local attribution map (Gu & Dong, CVPR 2021) of an output window over the input pixels, on the same engine.
"""
__version__ = "0.1.0"

from faig_fast.errors import (CheckpointError, CompletenessWarning, FAIGError, InvalidInputError,
                              ModelMismatchError)
from faig_fast.core.attribution import Attribution, jaccard, read_index_file, write_index_file
from faig_fast.core.api import attribute
from faig_fast.core.lam import LocalAttribution, lam

__all__ = [
    "attribute", "Attribution", "lam", "LocalAttribution", "jaccard", "read_index_file", "write_index_file",
    "FAIGError", "ModelMismatchError", "CompletenessWarning", "InvalidInputError", "CheckpointError", "__version__",
]
