"""Engine errors as the layers above see them; `models.errors` defines them (it sits lowest)."""

from models.errors import (
    ContextLengthExceededError,
    EngineError,
    GenerationError,
    InvalidImageError,
    InvalidRequestError,
    ModelNotReadyError,
    OverloadedError,
    ShuttingDownError,
)

__all__ = [
    "ContextLengthExceededError",
    "EngineError",
    "GenerationError",
    "InvalidImageError",
    "InvalidRequestError",
    "ModelNotReadyError",
    "OverloadedError",
    "ShuttingDownError",
]
