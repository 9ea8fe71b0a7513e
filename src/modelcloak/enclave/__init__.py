"""The trusted side: the smallest program that holds a private part's key and weights.

Rules: this package imports nothing from the rest of modelcloak (host code may import from here,
never the reverse), so it can be deployed alone inside a TEE (Gramine-SGX, a Nitro enclave) with
only its third-party dependencies: `cryptography`, `numpy`, `onnxruntime` and (Linux) `pyseccomp`.
"""
