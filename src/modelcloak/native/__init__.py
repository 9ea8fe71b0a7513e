"""The native enclave backend: a split bundle's private part compiled to a small C program.

`build_for_bundle` / `build_from_bundle` write and compile it; `check_supported` refuses, by
name, an op it does not implement. The binary speaks the protocol of `modelcloak.enclave` and is
started by the host's unchanged `EnclaveClient(command=[binary])`. See docs/NATIVE.md.
"""

from modelcloak.native.build import (
    NativeBuild,
    build_for_bundle,
    build_for_header,
    build_from_bundle,
    check_private_part,
    compile_enclave,
    generate,
)
from modelcloak.native.codegen import SUPPORTED, check_supported
from modelcloak.native.errors import NativeError

__all__ = [
    "SUPPORTED",
    "NativeBuild",
    "NativeError",
    "build_for_bundle",
    "build_for_header",
    "build_from_bundle",
    "check_private_part",
    "check_supported",
    "compile_enclave",
    "generate",
]
