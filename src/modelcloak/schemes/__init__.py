"""The protection schemes, one module each, behind one protocol (`modelcloak.schemes.base.Scheme`).

Adding a scheme means adding a module with a `SCHEME` object and naming it in `_MODULES`.
"""

from __future__ import annotations

import importlib

from modelcloak.errors import ModelcloakError
from modelcloak.schemes.base import BundlePlan, OpenContext, ProtectRequest, Scheme, SchemeClaims

__all__ = ["SCHEMES", "BundlePlan", "OpenContext", "ProtectRequest", "Scheme", "SchemeClaims", "claims_for", "get"]

# Scheme name -> module. Imported on first use: opening a seal bundle loads no FHE or enclave code.
_MODULES = {
    "seal": "modelcloak.schemes.seal",
    "split": "modelcloak.schemes.split",
    "lock": "modelcloak.schemes.lock",
    "fhe": "modelcloak.schemes.fhe",
}
SCHEMES = tuple(_MODULES)


def get(name: str) -> Scheme:
    """The scheme called `name`; a ModelcloakError naming the available ones if there is none."""
    module = _MODULES.get(name)
    if module is None:
        raise ModelcloakError(f"unknown scheme {name!r}; available: {', '.join(SCHEMES)}")
    scheme: Scheme = importlib.import_module(module).SCHEME
    return scheme


def claims_for(name: str) -> SchemeClaims | None:
    return get(name).claims if name in _MODULES else None
