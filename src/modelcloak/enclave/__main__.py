"""Entry point: `python -m modelcloak.enclave --fd N (--key-file PATH | --key-env VAR) [options]`.

Start-up order is part of the security argument: harden the process, read the key (before any
sandbox, and before the heavy imports so a bad key fails fast), then import onnxruntime and
serve. Frames never use stdin/stdout; the channel is the descriptor passed with --fd (or a TCP
connection made with --connect, for runtimes such as Gramine that do not inherit descriptors).
"""

from __future__ import annotations

import time

_STARTED_MONOTONIC = time.monotonic()  # first thing: the start-up time reported in READY

import argparse  # noqa: E402  (after the clock, on purpose)
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402

from modelcloak.enclave import sandbox, spin  # noqa: E402  (stdlib only; the heavy imports come later)

EXIT_USAGE = 2
EXIT_BAD_CHANNEL = 3
EXIT_SANDBOX = 4


def _process_start_time() -> tuple[float, float]:
    """(Unix time, monotonic time) this process started, from /proc; falls back to module import."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 overall; counted after the "(comm)" field
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 3600:
            now_wall, now_mono = time.time(), time.monotonic()
            return now_wall - age, now_mono - age
    except (OSError, ValueError, IndexError):
        pass
    return time.time() - (time.monotonic() - _STARTED_MONOTONIC), _STARTED_MONOTONIC


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _spin_microseconds(text: str) -> int:
    value = int(text)
    if not 0 <= value <= spin.MAX_SPIN_SECONDS * 1e6:
        raise argparse.ArgumentTypeError(f"must be 0..{round(spin.MAX_SPIN_SECONDS * 1e6)}, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modelcloak.enclave",
        description="modelcloak enclave: decrypts a split bundle's private part and serves it under its policy.",
    )
    channel = parser.add_mutually_exclusive_group(required=True)
    channel.add_argument("--fd", type=int, help="bidirectional descriptor (socket pair end) carrying the frames")
    channel.add_argument("--connect", metavar="HOST:PORT", help="connect to the host over TCP instead (Gramine)")
    key = parser.add_mutually_exclusive_group(required=True)
    key.add_argument("--key-file", help="file holding the 32-byte enclave key (raw, hex or base64; mode 600)")
    key.add_argument("--key-env", help="environment variable holding the enclave key (hex or base64)")
    parser.add_argument("--threads", type=_positive, default=None, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--max-frame-bytes", type=_positive, default=None, help="largest frame accepted or sent (default 64 MiB)"
    )
    parser.add_argument("--max-memory-mb", type=_positive, default=None, help="RLIMIT_AS for the whole process")
    parser.add_argument(
        "--tpm",
        metavar="TCTI",
        default=None,
        help="TPM holding a `tpm` budget's counter: device:/dev/tpmrm0, a device path or swtpm:host=H,port=P",
    )
    parser.add_argument(
        "--spin-us",
        type=_spin_microseconds,
        default=round(spin.DEFAULT_SPIN_SECONDS * 1e6),
        metavar="MICROSECONDS",
        help="how long to poll for the next request before blocking (0: never; docs/ENCLAVE.md, 'Spinning')",
    )
    parser.add_argument(
        "--seccomp",
        choices=("on", "off"),
        default="on",
        help="install the seccomp filter after loading (off only where the platform has none, e.g. Gramine)",
    )
    return parser


def _channel_fd(args: argparse.Namespace) -> int:
    if args.connect:
        host, _, port = args.connect.rpartition(":")
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn.detach()
    fd = int(args.fd)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        raise OSError(f"descriptor {fd} is not a socket, pipe or character device")
    if fd in (0, 1, 2):
        raise OSError("frames do not travel on stdin/stdout/stderr; pass another descriptor")
    return fd


def _send_startup_error(fd: int, message: str) -> None:
    """An ERROR frame with request id 0 (the client is waiting for HELLO), built without numpy."""
    code = 15  # ErrorCode.KEY_UNAVAILABLE, spelled out so this path imports nothing heavy
    payload = struct.pack(">H", code) + message.encode("utf-8")[:1024]
    try:
        os.write(fd, struct.pack(">IBQ", 9 + len(payload), 0xFF, 0) + payload)
    except OSError:
        pass


class _quiet_stderr:  # noqa: N801  (used as a statement-like context manager)
    """Descriptor 2 to /dev/null for the duration (native libraries write there directly)."""

    def __enter__(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    hardening = sandbox.Hardening()
    sandbox.scrub_environment()
    sandbox.harden_early(hardening, max_address_space=args.max_memory_mb * 1024 * 1024 if args.max_memory_mb else None)
    started_at, started_monotonic = _process_start_time()
    try:
        fd = _channel_fd(args)
    except (OSError, ValueError) as exc:
        print(f"modelcloak enclave: cannot use the channel: {exc}", file=sys.stderr)
        return EXIT_BAD_CHANNEL
    try:
        key = sandbox.read_key(key_file=args.key_file, key_env=args.key_env)
    except sandbox.KeyUnavailable as exc:
        _send_startup_error(fd, f"the enclave could not read its key: {exc}")
        print(f"modelcloak enclave: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if key.locked:
        hardening.applied.add("key_locked")
    # SIGTERM unwinds through the server's `finally`, which wipes the key and drops the model.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    from modelcloak.enclave import protocol

    with _quiet_stderr():
        # onnxruntime's telemetry warns at import that it cannot persist a device id (HOME is
        # unusable on purpose); that line would otherwise be the enclave's "last words".
        from modelcloak.enclave.server import EnclaveServer

    max_frame = args.max_frame_bytes or protocol.DEFAULT_MAX_FRAME_BYTES
    if not protocol.MIN_MAX_FRAME_BYTES <= max_frame <= protocol.MAX_MAX_FRAME_BYTES:
        key.wipe()
        print(
            "modelcloak enclave: --max-frame-bytes must be "
            f"{protocol.MIN_MAX_FRAME_BYTES}..{protocol.MAX_MAX_FRAME_BYTES}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    server = EnclaveServer(
        fd,
        key,
        threads=args.threads,
        max_frame_bytes=max_frame,
        use_seccomp=args.seccomp == "on",
        hardening=hardening,
        started_at=started_at,
        started_monotonic=started_monotonic,
        tpm=args.tpm,
        spin_seconds=args.spin_us / 1e6,
    )
    return server.serve()


if __name__ == "__main__":
    sys.exit(main())
