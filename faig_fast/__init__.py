"""faig_fast: Filter Attribution based on Integral Gradients (FAIG), fast."""
from faig_fast.errors import CheckpointError, FAIGError, InvalidInputError, ModelMismatchError

__version__ = "0.1.0"

__all__ = ["FAIGError", "ModelMismatchError", "InvalidInputError", "CheckpointError", "__version__"]
