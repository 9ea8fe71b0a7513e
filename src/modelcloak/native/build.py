"""Write and compile a native enclave for one split bundle (docs/NATIVE.md).

    build_for_bundle(bundle_path, private_model_bytes, out_dir)   # at protect time: the owner has the part
    build_from_bundle(bundle_path, enclave_key_file, out_dir)     # later: decrypts the part with its key

Both write `out_dir/` with model.c (generated), enclave.c, kernels.h, mc_model.h (fixed), a
Makefile, and build `out_dir/modelcloak-enclave` with the system C compiler and libcrypto. The
binary is then used in place of `python -m modelcloak.enclave`:
`EnclaveClient(command=[str(binary)])`, or `runtime.load(..., enclave_command=[str(binary)])`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from modelcloak.bundle.container import Bundle
from modelcloak.enclave import chunks, protocol
from modelcloak.enclave import policy as policy_mod
from modelcloak.enclave.protocol import NO_LIMIT, TensorSpec
from modelcloak.native import codegen
from modelcloak.native.errors import NativeError

BINARY_NAME = "modelcloak-enclave"
FIXED_SOURCES = ("enclave.c", "kernels.h", "mc_model.h")
_MODES = {"label": 1, "topk": 2, "scores": 3}
# A -march value: a CPU or ISA level name (native, x86-64-v3, znver2, armv8.2-a+fp16), nothing else.
_ARCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")

MAKEFILE = """\
# Native modelcloak enclave for one bundle. `make` builds ./modelcloak-enclave with gcc and libcrypto.
# MC_ARCH=-march=x86-64-v3 (or armv8.2-a) builds for a fleet instead of this machine.
CC ?= gcc
MC_ARCH ?= -march=native
CFLAGS ?= -std=c99 -O3 $(MC_ARCH) -fno-math-errno -Wall -Wextra -Wno-unused-parameter -fstack-protector-strong \\
	-D_FORTIFY_SOURCE=2 -fPIE
LDFLAGS ?= -pie -Wl,-z,relro,-z,now,-z,noexecstack
LDLIBS = -lcrypto -lm

modelcloak-enclave: enclave.c model.c kernels.h mc_model.h
\t$(CC) $(CFLAGS) -o $@ enclave.c model.c $(LDFLAGS) $(LDLIBS)

clean:
\trm -f modelcloak-enclave
.PHONY: clean
"""


@dataclass(frozen=True)
class NativeBuild:
    """Where the enclave was written and what it is made of."""

    directory: Path
    binary: Path
    generated_lines: int  # model.c
    runtime_lines: int  # enclave.c + kernels.h + mc_model.h
    ops: tuple[str, ...]
    tile: int

    def command(self) -> list[str]:
        """The `command` for EnclaveClient / runtime.load: this binary instead of the Python enclave."""
        return [str(self.binary)]


def _spec_of(arg: object) -> TensorSpec:
    code = protocol.ORT_TYPE_CODES.get(arg.type)  # type: ignore[attr-defined]
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or []))  # type: ignore[attr-defined]
    return TensorSpec(arg.name, protocol.DTYPE_BY_CODE[code] if code else None, shape)  # type: ignore[attr-defined]


def _ready_head(model_bytes: bytes, policy: policy_mod.OutputPolicy) -> bytes:
    """READY's specs and policy exactly as the Python enclave derives them from onnxruntime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    inputs = tuple(_spec_of(a) for a in session.get_inputs())
    outputs = tuple(_spec_of(a) for a in session.get_outputs())
    try:
        policy_mod.check_applicable(policy, outputs[0].shape if outputs else None)
    except policy_mod.PolicyError as exc:
        raise NativeError(f"the bundle's output policy cannot apply to its private part: {exc}") from None
    shapes = policy_mod.result_shapes(policy, [o.name for o in outputs], [o.shape for o in outputs])
    results = tuple(
        TensorSpec(name, np.dtype(dtype) if dtype else raw.dtype, shape)
        for (name, dtype, shape), raw in zip(shapes, outputs)
    )
    return b"".join(
        [
            protocol.encode_specs(inputs),
            protocol.encode_specs(outputs),
            protocol.encode_specs(results),
            protocol.encode_policy(policy),
        ]
    )


def _bundle_facts(header: bytes, model_bytes: bytes) -> dict[str, object]:
    """What the C program checks and needs from the header, read here with the enclave's own parser."""
    from modelcloak.enclave.server import Refusal, parse_header

    try:
        document = json.loads(header[14:].decode("utf-8"))
        key_id = document["enclave_key"]["id"]
        sealed = parse_header(header, key_id)
    except (ValueError, KeyError, TypeError):
        raise NativeError("the bundle header does not name an enclave key; is this a split bundle?") from None
    except Refusal as exc:
        raise NativeError(f"the bundle header cannot be used: {exc}") from None
    if sealed.size != len(model_bytes):
        raise NativeError("the private part given is not the one sealed in this bundle (sizes differ)")
    policy = sealed.policy
    if policy.output == "topk" and policy.k is not None and policy.k > 65535:
        raise NativeError("top-K above 65535 is not supported by the native enclave")
    return {
        "digest": hashlib.sha256(header).digest(),
        "key_id": bytes.fromhex(key_id),
        "salt": sealed.salt,
        "section": sealed.name,
        "index": sealed.index,
        "chunk_size": sealed.chunk_size,
        "ready_head": _ready_head(model_bytes, policy),
        "mode": _MODES[policy.output],
        "k": policy.k or 0,
        "budget": NO_LIMIT if policy.query_budget is None else policy.query_budget,
        "rate": policy.rate_limit_per_s or 0.0,
    }


def generate(header: bytes, model_bytes: bytes, out_dir: str | Path) -> codegen.Program:
    """Write the sources and Makefile for the bundle with `header` and private part `model_bytes`."""
    program, generator = codegen.lower(model_bytes)
    facts = _bundle_facts(header, model_bytes)
    if facts["mode"] != 3 and program.outputs and len(program.outputs[0][1]) == 0:
        raise NativeError("the label/topk policy needs a first private output with a class axis")
    if facts["mode"] == 2 and program.outputs[0][1][-1] > 65536:
        raise NativeError("top-K over more than 65536 classes is not supported by the native enclave")
    program.source = codegen.render(program, generator, facts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    package = resources.files("modelcloak.native") / "csrc"
    for name in FIXED_SOURCES:
        (out / name).write_text((package / name).read_text())
    (out / "model.c").write_text(program.source)
    (out / "Makefile").write_text(MAKEFILE)
    return program


def compile_enclave(
    out_dir: str | Path, *, cc: str | None = None, arch: str = "native", timeout: float = 300.0
) -> Path:
    """Run make in `out_dir`; NativeError with the compiler's first error line on failure.

    `arch` is the compiler's -march: "native" tunes for this machine (the binary may not run on an
    older CPU); a fleet's baseline such as "x86-64-v3" or "armv8.2-a" builds for every machine of it."""
    out = Path(out_dir)
    if not _ARCH.fullmatch(arch):
        raise NativeError(f"arch {arch!r} is not a -march name such as native, x86-64-v3 or armv8.2-a")
    if shutil.which("make") is None:
        raise NativeError("building the native enclave needs make and a C compiler (apt-get install build-essential)")
    env_cc = ["CC=" + cc] if cc else []
    try:
        done = subprocess.run(
            ["make", "-s", "-C", str(out), *env_cc, f"MC_ARCH=-march={arch}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NativeError(f"building the native enclave took longer than {timeout:g} s") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if "error" in line.lower()]
        hint = " (install libssl-dev for libcrypto's headers)" if "openssl/" in done.stderr else ""
        if "march" in done.stderr:
            hint = f" (the compiler does not know -march={arch})"
        raise NativeError(f"building the native enclave failed: {(lines or ['make failed'])[0].strip()}{hint}")
    return out / BINARY_NAME


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def check_private_part(model_bytes: bytes) -> None:
    """NativeError, naming what, when the native enclave cannot run this private part."""
    codegen.lower(model_bytes)


def build_for_bundle(
    bundle_path: str | Path, model_bytes: bytes, out_dir: str | Path, *, arch: str = "native"
) -> NativeBuild:
    """Generate and compile the native enclave for a bundle whose private part the caller holds."""
    with Bundle.open(bundle_path) as bundle:
        header = bundle.header
    return build_for_header(header, model_bytes, out_dir, arch=arch)


def build_for_header(header: bytes, model_bytes: bytes, out_dir: str | Path, *, arch: str = "native") -> NativeBuild:
    """As build_for_bundle, from the bundle's header bytes (`Bundle.header`)."""
    program = generate(header, model_bytes, out_dir)
    binary = compile_enclave(out_dir, arch=arch)
    out = Path(out_dir)
    return NativeBuild(
        directory=out,
        binary=binary,
        generated_lines=_lines(out / "model.c"),
        runtime_lines=sum(_lines(out / name) for name in FIXED_SOURCES),
        ops=tuple(program.ops),
        tile=program.tile,
    )


def build_from_bundle(
    bundle_path: str | Path, enclave_key_file: str | Path, out_dir: str | Path, *, arch: str = "native"
) -> NativeBuild:
    """Decrypt a split bundle's private part with the enclave key, then build its native enclave."""
    from modelcloak.enclave.sandbox import KeyUnavailable, parse_key_text

    try:
        key = parse_key_text(Path(enclave_key_file).read_bytes(), f"enclave key file {enclave_key_file}")
    except (OSError, KeyUnavailable) as exc:
        raise NativeError(f"cannot read the enclave key: {exc}") from None
    with Bundle.open(bundle_path) as bundle:
        header = bundle.header
        entries = [s for s in bundle.manifest.sections if s.key == "enclave"]
        if len(entries) != 1:
            raise NativeError(f"{bundle_path} is not a split bundle (it has no enclave section)")
        from modelcloak.enclave.server import key_id

        expected = bundle.manifest.document.get("enclave_key", {}).get("id")
        if key_id(bytes(key)) != expected:
            raise NativeError(f"wrong enclave key: the bundle was sealed for enclave key id {expected}")
        salt = bundle.manifest.salt
        section_key = chunks.derive(bytes(key), salt, "section/" + entries[0].name)
        key[:] = bytes(len(key))
        ciphertext = bundle.section_ciphertext(entries[0].name)
        plain = bytearray(entries[0].size)
        try:
            chunks.decrypt_section_into(
                section_key,
                hashlib.sha256(header).digest(),
                bundle.section_index(entries[0].name),
                entries[0].name,
                lambda offset, dest: dest.__setitem__(slice(None), ciphertext[offset : offset + len(dest)]),
                memoryview(plain),
                bundle.manifest.chunk_size,
            )
        except chunks.ChunkAuthenticationError as exc:
            raise NativeError(f"cannot decrypt the private part: {exc}") from None
    try:
        return build_for_bundle(bundle_path, bytes(plain), out_dir, arch=arch)
    finally:
        plain[:] = bytes(len(plain))
