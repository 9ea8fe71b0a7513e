"""`modelcloak owner ...` as a user runs it: real subprocesses on a SQLite file, one-line errors, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelcloak", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", "MODELCLOAK_OWNER_DB": str(cwd / "owner.db")},
    )


def one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelcloak: error: ") and fragment in lines[0], result.stderr


@pytest.mark.slow
def test_owner_workflow_from_the_command_line(tmp_path: Path) -> None:
    ok = cli("owner", "init", "--master-key-file", "master.key", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "schema revision 0005" in ok.stdout and (tmp_path / "master.key").stat().st_mode & 0o077 == 0
    assert cli("keygen", "model.key", cwd=tmp_path).returncode == 0
    assert (
        cli(
            "owner",
            "model",
            "register",
            "mnist",
            "--model-key-file",
            "model.key",
            "--master-key-file",
            "master.key",
            cwd=tmp_path,
        ).returncode
        == 0
    )
    identity = cli("owner", "sim-device", "device.pem", cwd=tmp_path).stdout.strip()
    assert len(identity) == 64
    enrolled = cli(
        "owner",
        "device",
        "enroll",
        "dev1",
        "--kind",
        "sim",
        "--identity",
        identity,
        "-m",
        "app=" + "ab" * 32,
        "--master-key-file",
        "master.key",
        cwd=tmp_path,
    )
    assert enrolled.returncode == 0 and "INSECURE" in enrolled.stdout
    issued = cli(
        "owner",
        "licence",
        "issue",
        "--model",
        "mnist",
        "--device",
        "dev1",
        "--quota",
        "100",
        "--min-serial",
        "5",
        "--allow-sim",
        "--master-key-file",
        "master.key",
        cwd=tmp_path,
    )
    assert issued.returncode == 0, issued.stderr
    licence = issued.stdout.strip()
    assert licence.startswith("lic_")
    listed = json.loads(cli("owner", "licence", "list", "--json", cwd=tmp_path).stdout)
    assert [(row["id"], row["query_quota"], row["revoked"], row["min_serial"]) for row in listed] == [
        (licence, 100, False, 5)
    ]
    pin = ("owner", "licence", "pin", licence, "--master-key-file", "master.key")
    assert cli(*pin, "--min-serial", "7", cwd=tmp_path).returncode == 0
    assert json.loads(cli("owner", "licence", "list", "--json", cwd=tmp_path).stdout)[0]["min_serial"] == 7
    one_line_error(cli(*pin, "--min-serial", "-1", cwd=tmp_path), "minimum serial must be an integer")
    one_line_error(cli("owner", "licence", "revoke", licence, cwd=tmp_path), "master key")
    revoke = ("owner", "licence", "revoke", licence, "--master-key-file", "master.key")
    assert cli(*revoke, "--reason", "test over", cwd=tmp_path).returncode == 0
    listed = json.loads(cli("owner", "licence", "list", "--json", cwd=tmp_path).stdout)
    assert listed[0]["revoked"] is True
    assert json.loads(cli("owner", "usage", "--json", cwd=tmp_path).stdout) == []

    # Bad input: one line each, exit 2, no traceback.
    one_line_error(cli(*revoke, cwd=tmp_path), "already revoked")
    migrated = cli("owner", "migrate", "--master-key-file", "master.key", cwd=tmp_path)
    assert migrated.returncode == 0 and "tagged 0 untagged" in migrated.stdout, migrated.stderr
    one_line_error(
        cli(
            "owner",
            "licence",
            "issue",
            "--model",
            "nope",
            "--device",
            "dev1",
            "--master-key-file",
            "master.key",
            cwd=tmp_path,
        ),
        "model nope is not registered",
    )
    one_line_error(cli("owner", "licence", "issue", "--model", "mnist", cwd=tmp_path), "master key")
    enroll = ("owner", "device", "enroll", "dev2", "--master-key-file", "master.key")
    one_line_error(cli(*enroll, "--kind", "sim", "-m", "app", cwd=tmp_path), "NAME=HEX")
    one_line_error(cli(*enroll, "--kind", "tpm", "-m", "pcr0=00", cwd=tmp_path), "attestation identity")
    one_line_error(
        cli("serve", "--db", str(tmp_path / "no" / "such.db"), "--master-key-file", "master.key", cwd=tmp_path),
        "does not exist",
    )
    one_line_error(cli("owner", "usage", "--db", "mysql://x/y", cwd=tmp_path), "not supported")


@pytest.mark.parametrize("mode", [0o644])
def test_a_master_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    assert cli("owner", "init", "--master-key-file", "master.key", cwd=tmp_path).returncode == 0
    os.chmod(tmp_path / "master.key", mode)
    one_line_error(cli("owner", "init", "--master-key-file", "master.key", cwd=tmp_path), "readable by other users")
