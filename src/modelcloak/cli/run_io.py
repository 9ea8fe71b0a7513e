"""Files `modelcloak run` reads and writes: input arrays, the outputs archive. Every problem is a
ModelcloakError with one line, raised before any inference runs where it can be."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelcloak.errors import ModelcloakError

__all__ = ["check_output_path", "load_inputs", "output_lines", "save_outputs"]


def load_inputs(path: Path) -> dict[str, Any] | np.ndarray:
    """A .npy (one array) or .npz (arrays by input name); pickled objects are never loaded."""
    if not path.exists():
        raise ModelcloakError(f"input file {path} does not exist")
    if path.is_dir():
        raise ModelcloakError(f"input file {path} is a directory")
    if path.stat().st_size == 0:
        raise ModelcloakError(f"input file {path} is empty (expected .npy or .npz)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelcloakError(f"{path} is not a readable .npy/.npz file ({reason})") from None
    # NpzFile hands back a member that is not .npy data as raw bytes instead of failing.
    broken = [name for name, value in arrays.items() if not isinstance(value, np.ndarray)]
    if broken:
        raise ModelcloakError(f"{path} is not a readable .npy/.npz file (member {broken[0]!r} is not an array)")
    return arrays


def check_output_path(path: Path) -> None:
    """Refuse an output path that cannot be written, before the model is even loaded."""
    if path.is_dir():
        raise ModelcloakError(f"--out {path} is a directory; name a .npz file")
    if path.suffix != ".npz":
        raise ModelcloakError(f"--out must name a .npz file, got {path.name}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ModelcloakError(f"--out {path}: folder {parent} does not exist")


def save_outputs(path: Path, results: Mapping[str, Any]) -> int:
    """Write outputs into a .npz by output name; returns the number of arrays written.

    Written entry by entry rather than with ``np.savez(path, **results)``, whose own parameters
    (``file``, ``allow_pickle``) would swallow outputs of that name. A sequence output becomes
    ``name.0``, ``name.1``, ...; an empty optional output is left out.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, value in results.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            arrays.update({f"{name}.{index}": np.asarray(item) for index, item in enumerate(value)})
        else:
            arrays[name] = np.asarray(value)
    try:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelcloakError(f"cannot write {path}: {exc}") from None
    return len(arrays)


def output_lines(results: Mapping[str, Any]) -> list[str]:
    """Outputs as text for the terminal: a header and the values per output (sequences item by item)."""
    lines: list[str] = []
    for name, value in results.items():
        if value is None:
            lines.append(f"{name}: empty optional")
        elif isinstance(value, list | tuple):
            lines.append(f"{name}: sequence of {len(value)}")
            for index, item in enumerate(value):
                lines.extend(output_lines({f"{name}[{index}]": item}))
        else:
            array = np.asarray(value)
            lines.append(f"{name}: shape {list(array.shape)} dtype {array.dtype}")
            lines.append(np.array2string(array, threshold=200, precision=5))
    return lines
