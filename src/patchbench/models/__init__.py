"""Model adapters, removal operators and the embedded default models."""

from patchbench.models import imputation  # noqa: F401  (registers road and inpaint)
from patchbench.models.adapter import ImageAdapter, NotAViTError, ViTAdapter
from patchbench.models.removal import OPERATORS, RemovalOperator, create_operator, list_operators
from patchbench.models.zoo import MODELS, load_model

__all__ = [
    "MODELS", "OPERATORS", "ImageAdapter", "NotAViTError", "RemovalOperator", "ViTAdapter",
    "create_operator", "list_operators", "load_model",
]
