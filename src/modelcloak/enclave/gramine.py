"""A Gramine-SGX manifest template for the enclave entry point (`python -m modelcloak.enclave`).

`render_manifest` writes a `.manifest.template` in Gramine's TOML syntax. It still contains
Gramine's own Jinja placeholders (`{{ gramine.libos }}`, `{{ gramine.runtimedir() }}`,
`{{ arch_libdir }}`), only inside TOML strings, so the output is valid TOML before and after
`gramine-manifest` renders it. Deployment:

    python -m modelcloak.enclave.gramine > modelcloak-enclave.manifest.template
    gramine-manifest -Darch_libdir=/lib/x86_64-linux-gnu \\
        modelcloak-enclave.manifest.template modelcloak-enclave.manifest
    gramine-sgx-sign --manifest modelcloak-enclave.manifest --output modelcloak-enclave.manifest.sgx
    gramine-sgx modelcloak-enclave

Choices, and why:

- `loader.argv` is fixed in the manifest (not taken from the host's command line), so the host
  cannot change the enclave's options; the channel is a TCP connection to the host (`--connect`)
  because Gramine does not pass arbitrary host descriptors into the enclave.
- `--seccomp off`: Gramine's library OS does not implement seccomp filters; inside SGX the
  enclave boundary, not a filter, keeps the host out.
- The enclave key is read from an encrypted mount sealed to this enclave's measurement
  (`_sgx_mrenclave`), so only this exact enclave build on this CPU can read it. Provisioning it
  there (after remote attestation with DCAP) is the key-release service's job.
- Trusted files (hashed at signing time, checked on every open) are the interpreter, the
  standard library, the site-packages directories (numpy, onnxruntime and cryptography live
  there; a wheel install of modelcloak puts its host modules there too: measured, never imported)
  and, for an editable install, only `modelcloak/enclave/` plus the two parent-package modules
  `python -m` imports on the way (`modelcloak/__init__.py`, `modelcloak/errors.py`).
- `sgx.debug = false`: a debug enclave can be read by the host, which defeats the point.

This file has not been run on SGX hardware here; see docs/ENCLAVE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

DEFAULT_ENCLAVE_SIZE = "4G"
DEFAULT_KEY_DIR = "/modelcloak-keys"


def _q(text: str) -> str:
    """A TOML basic string (JSON string escapes are a subset TOML accepts)."""
    return json.dumps(text, ensure_ascii=False)


def _qlist(items: Sequence[str], indent: str = "  ") -> str:
    return "[\n" + "".join(f"{indent}{_q(item)},\n" for item in items) + "]"


def _mount(path: str, uri: str, kind: str | None = None, key_name: str | None = None) -> str:
    fields = [f"path = {_q(path)}", f"uri = {_q(uri)}"]
    if kind:
        fields.insert(0, f"type = {_q(kind)}")
    if key_name:
        fields.append(f"key_name = {_q(key_name)}")
    return "{ " + ", ".join(fields) + " }"


def _python_dirs() -> tuple[list[str], list[str]]:
    """(standard library directories, site-packages directories) of this interpreter."""
    paths = sysconfig.get_paths()
    stdlib = sorted({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if paths.get(k)})
    site = sorted({os.path.realpath(paths[k]) for k in ("purelib", "platlib") if paths.get(k)})
    return stdlib, site


def _libpython() -> str | None:
    """The shared libpython the interpreter links against, if it was built with --enable-shared."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not name:
        return None
    path = os.path.join(libdir, name)
    return os.path.realpath(path) if os.path.exists(path) else None


def _package_root() -> str:
    """The directory that contains the `modelcloak` package (site-packages, or src/ when editable)."""
    return str(Path(__file__).resolve().parents[2])


def _outermost(paths: Sequence[str]) -> list[str]:
    """Drop paths nested inside another listed path (one mount covers both)."""
    result: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(path == p or path.startswith(p.rstrip("/") + "/") for p in result):
            result.append(path)
    return sorted(result)


def render_manifest(
    python_executable: str,
    *,
    connect: str = "127.0.0.1:7878",
    threads: int = 4,
    enclave_size: str = DEFAULT_ENCLAVE_SIZE,
    max_threads: int | None = None,
    key_host_dir: str = "keys",
    key_file_name: str = "enclave.key",
    max_frame_bytes: int | None = None,
    site_packages: Sequence[str] | None = None,
    stdlib: Sequence[str] | None = None,
    package_root: str | None = None,
    log_level: str = "error",
) -> str:
    """A Gramine-SGX `.manifest.template` (TOML) that runs `python -m modelcloak.enclave`.

    `connect` is the host's TCP listener the enclave dials; `threads` sets onnxruntime's
    intra-op threads and OMP_NUM_THREADS; `key_host_dir` is the host directory of the encrypted
    key mount. Directories default to those of the running interpreter and this installation.
    """
    python = os.path.realpath(python_executable)
    own_stdlib, own_site = _python_dirs()
    stdlib_dirs = [os.path.realpath(p) for p in (stdlib if stdlib is not None else own_stdlib)]
    site_dirs = [os.path.realpath(p) for p in (site_packages if site_packages is not None else own_site)]
    root = os.path.realpath(package_root or _package_root())
    # Gramine needs a thread slot for each onnxruntime thread plus its own helpers (IPC, async, TLS).
    slots = max_threads if max_threads is not None else threads + 8
    key_path = f"{DEFAULT_KEY_DIR}/{key_file_name}"
    argv = [python, "-m", "modelcloak.enclave", "--connect", connect, "--key-file", key_path]
    argv += ["--threads", str(threads), "--seccomp", "off"]
    if max_frame_bytes:
        argv += ["--max-frame-bytes", str(max_frame_bytes)]

    libpython = _libpython()
    # Single files are mounted as files, so no neighbouring binaries become visible inside.
    python_files = [python] + ([libpython] if libpython else [])
    python_dirs = _outermost([*stdlib_dirs, *site_dirs, root])
    mounts = [
        _mount("/lib", "file:{{ gramine.runtimedir() }}"),
        _mount("{{ arch_libdir }}", "file:{{ arch_libdir }}"),
        _mount("/usr/{{ arch_libdir }}", "file:/usr/{{ arch_libdir }}"),
        *(_mount(p, f"file:{p}") for p in python_files),
        *(_mount(p, f"file:{p}") for p in python_dirs),
        _mount(DEFAULT_KEY_DIR, f"file:{key_host_dir}", "encrypted", "_sgx_mrenclave"),
        _mount("/tmp", "file:/tmp", "tmpfs"),
    ]
    trusted = [
        "file:{{ gramine.libos }}",
        "file:{{ gramine.runtimedir() }}/",
        "file:{{ arch_libdir }}/",
        "file:/usr/{{ arch_libdir }}/",
        *(f"file:{p}" for p in python_files),
        *(f"file:{d}/" for d in _outermost(stdlib_dirs + site_dirs)),
        # The trusted side and the two parent-package modules `python -m` imports on the way.
        f"file:{root}/modelcloak/__init__.py",
        f"file:{root}/modelcloak/errors.py",
        f"file:{root}/modelcloak/enclave/",
    ]
    lines = [
        "# modelcloak enclave: Gramine-SGX manifest template, generated by modelcloak.enclave.gramine.",
        "# Render with gramine-manifest, sign with gramine-sgx-sign. Do not enable sgx.debug in production.",
        "",
        'loader.entrypoint = "file:{{ gramine.libos }}"',
        f"libos.entrypoint = {_q(python)}",
        f"loader.log_level = {_q(log_level)}",
        "",
        "# Fixed arguments: the host cannot change the enclave's options.",
        f"loader.argv = {_qlist(argv)}",
        "",
        "loader.env.LD_LIBRARY_PATH = "
        + _q(
            ":".join(
                ["/lib", "{{ arch_libdir }}", "/usr/{{ arch_libdir }}"]
                + ([os.path.dirname(libpython)] if libpython else [])
            )
        ),
        f"loader.env.PYTHONPATH = {_q(root)}",
        'loader.env.PYTHONDONTWRITEBYTECODE = "1"',
        f"loader.env.OMP_NUM_THREADS = {_q(str(threads))}",
        f"loader.env.OPENBLAS_NUM_THREADS = {_q(str(threads))}",
        "",
        "fs.mounts = [",
        *(f"  {m}," for m in mounts),
        "]",
        "",
        "sgx.debug = false",
        'sgx.remote_attestation = "dcap"',
        f"sgx.enclave_size = {_q(enclave_size)}",
        f"sgx.max_threads = {slots}",
        "sgx.edmm_enable = false",
        'sys.stack.size = "2M"',
        "",
        f"sgx.trusted_files = {_qlist(trusted)}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelcloak.enclave.gramine",
        description="Print a Gramine-SGX manifest template for the modelcloak enclave.",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter to run inside the enclave")
    parser.add_argument("--connect", default="127.0.0.1:7878", help="host TCP listener the enclave dials")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--enclave-size", default=DEFAULT_ENCLAVE_SIZE)
    parser.add_argument("--key-host-dir", default="keys", help="host directory of the encrypted key mount")
    args = parser.parse_args(argv)
    sys.stdout.write(
        render_manifest(
            args.python,
            connect=args.connect,
            threads=args.threads,
            enclave_size=args.enclave_size,
            key_host_dir=args.key_host_dir,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
