"""The project's exception types: every bad input ends in one of these, with a message that names
what is wrong and where."""


class FAIGError(ValueError):
    """Base class for faig_fast's own errors."""


class ModelMismatchError(FAIGError):
    """The baseline and target models do not form a valid pair."""


class InvalidInputError(FAIGError):
    """An image, batch, label, loader or weight is not usable."""


class CheckpointError(FAIGError):
    """A checkpoint file is missing, corrupt or of an unknown layout."""


class CompletenessWarning(UserWarning):
    """The path integral does not add up to the loss change (Eq. 4) by more than the quadrature rule
    explains: the model probably changes state between forward passes (in-place input edits, call
    counters, randomness), so the scores may be wrong."""
