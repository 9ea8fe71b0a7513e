"""modelcloak: protect neural networks shipped to machines you do not control."""

from modelcloak.errors import ModelcloakError

__version__ = "0.1.0"

__all__ = ["ModelcloakError", "__version__", "load", "protect"]


def __getattr__(name: str):
    # Lazy so that `import modelcloak` stays cheap and the cache guard can run before
    # onnxruntime or OpenVINO are imported.
    if name == "load":
        from modelcloak.runtime import load

        return load
    if name == "protect":
        from modelcloak.protector import protect

        return protect
    raise AttributeError(f"module 'modelcloak' has no attribute {name!r}")
