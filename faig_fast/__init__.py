"""faig_fast: Filter Attribution based on Integral Gradients (FAIG), fast.

``faig_fast.attribute(model_a, model_b, loader)`` attributes the change from baseline ``model_a``
(θ̄) to target ``model_b`` (θ) to individual conv filters (Xie et al., NeurIPS 2021).
"""
__version__ = "0.1.0"

from faig_fast.errors import (CheckpointError, CompletenessWarning, FAIGError, InvalidInputError,
                              ModelMismatchError)
from faig_fast.core.attribution import Attribution, jaccard, read_index_file, write_index_file
from faig_fast.core.api import attribute

__all__ = [
    "attribute", "Attribution", "jaccard", "read_index_file", "write_index_file",
    "FAIGError", "ModelMismatchError", "CompletenessWarning", "InvalidInputError", "CheckpointError", "__version__",
]
