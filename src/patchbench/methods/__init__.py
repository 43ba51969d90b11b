"""Attribution methods, created by name from one registry.

Importing this package registers the built-in methods.
"""

from patchbench.methods import (  # noqa: F401  (registration)
    attention,
    controls,
    diffmask,
    gradients,
    perturbation,
    precomputed,
)
from patchbench.methods.base import (
    METHODS,
    Method,
    MethodOutputError,
    create_method,
    list_methods,
    register_method,
)

__all__ = ["METHODS", "Method", "MethodOutputError", "create_method", "list_methods",
           "register_method"]
