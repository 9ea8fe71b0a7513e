"""The framing layer both ends of the enclave connection use (issue 13, item 8): gathered writes of
tensor views, buffered reads that may hold parts of two frames, a frame cut by a timeout that the
next reader continues, and a client that reads its replies on the calling thread."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from modelcloak.enclave import protocol
from modelcloak.enclave.protocol import MsgType
from modelcloak.enclave.server import Channel
from modelcloak.keys import KeyFile
from modelcloak.runtime import enclave_client
from modelcloak.runtime.enclave_client import EnclaveClient


def test_tensor_parts_are_the_encoding_without_copies() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    parts = protocol.tensor_parts([("x", x), ("ids", np.arange(3, dtype=">i8"))])
    assert b"".join(parts) == protocol.encode_tensors([("x", x), ("ids", np.arange(3, dtype=">i8"))])
    # The C-ordered little-endian array is sent from its own memory, not from a copy.
    assert np.shares_memory(np.frombuffer(parts[2], np.float32), x)
    frame = protocol.frame_parts(MsgType.INFER, 7, parts)
    assert b"".join(frame) == protocol.encode_frame(MsgType.INFER, 7, b"".join(parts))
    assert protocol.frame_length(parts) == len(b"".join(frame)) - 4


def test_gathered_send_survives_partial_writes() -> None:
    """A frame larger than the socket buffer goes out in several sendmsg calls, byte for byte."""
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)  # 512 KiB
    frame = protocol.frame_parts(MsgType.INFER, 3, protocol.tensor_parts([("h", data)]))
    expected = b"".join(frame)
    received = bytearray()

    def drain() -> None:
        while len(received) < len(expected):
            received.extend(right.recv(65536))

    reader = threading.Thread(target=drain)
    reader.start()
    enclave_client._send_gathered(left, frame)
    reader.join(timeout=30)
    left.close()
    right.close()
    assert bytes(received) == expected


def test_enclave_channel_reads_coalesced_and_split_frames() -> None:
    host, enclave = socket.socketpair()
    channel = Channel(enclave.fileno(), 1 << 20)
    big = protocol.encode_tensors([("h", np.ones((300, 300), np.float32))])  # larger than the read buffer
    frames = [
        protocol.encode_frame(MsgType.PING, 1, b"a"),
        protocol.encode_frame(MsgType.PING, 2, b"bc"),
        protocol.encode_frame(MsgType.INFER, 3, big),
        protocol.encode_frame(MsgType.STATS, 4),
    ]
    stream = b"".join(frames)

    def send() -> None:
        host.sendall(stream[:20])  # the first frame and part of the second in one write
        host.sendall(stream[20:25])
        host.sendall(stream[25:])

    writer = threading.Thread(target=send)
    writer.start()
    got = [channel.next_frame() for _ in frames]
    writer.join()
    assert [(f.type, f.request_id) for f in got] == [
        (MsgType.PING, 1),
        (MsgType.PING, 2),
        (MsgType.INFER, 3),
        (MsgType.STATS, 4),
    ]
    assert got[0].payload == b"a" and got[1].payload == b"bc" and bytes(got[2].payload) == big
    host.close()
    enclave.close()


def test_host_inbox_continues_a_frame_cut_by_a_timeout() -> None:
    """A reader that times out mid-frame leaves it half-read; the next read finishes it in step."""
    enclave, host = socket.socketpair()
    inbox = enclave_client._Inbox(host, 1 << 20)
    payload = protocol.encode_tensors([("label", np.arange(5000, dtype=np.int64))])  # 40 KB
    first = protocol.encode_frame(MsgType.RESULT, 9, payload)
    second = protocol.encode_frame(MsgType.PONG, 10, b"xyz")
    enclave.sendall(first[:7])  # not even a whole header
    assert inbox.read(0.05) is None
    enclave.sendall(first[7:30000])
    assert inbox.read(0.05) is None  # header read, body incomplete
    enclave.sendall(first[30000:] + second)
    msg_type, request_id, body = inbox.read(1.0)
    assert (msg_type, request_id, bytes(body)) == (MsgType.RESULT, 9, payload)
    assert inbox.read(1.0) == (MsgType.PONG, 10, bytearray(b"xyz"))
    enclave.close()
    host.close()


@pytest.mark.parametrize("threads", [1, 6])
def test_replies_are_read_by_the_callers_without_a_reader_thread(key_file: KeyFile, threads: int) -> None:
    """No thread sits between the socket and a caller: replies reach each calling thread directly,
    also when several callers share the connection (one reads, the others are handed theirs)."""
    with EnclaveClient() as client:
        client.start(["--key-file", str(key_file.path)])
        before = {t.name for t in threading.enumerate()}
        assert not [name for name in before if name.endswith("-reader")]
        sizes = list(range(threads * 40))
        errors: list[BaseException] = []

        def call(size: int) -> None:
            try:
                client.ping(size)  # PONG must echo this caller's own payload, or ping() raises
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        workers = [threading.Thread(target=lambda s=s: [call(n) for n in sizes[s::threads]]) for s in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert not errors
        assert client.ping(0) >= 0


# -- the per-call fast paths (protocol.KnownTensors) ----------------------------------------------

_SPECS = (
    protocol.TensorSpec("h", np.dtype("<f4"), (None, 4)),
    protocol.TensorSpec("ids", np.dtype("<i8"), (None,)),
)


def _general(payload: bytes | bytearray) -> list[np.ndarray] | None:
    """What the general path accepts for _SPECS: decode_tensors, then names, dtypes, ranks, fixed dims."""
    try:
        tensors = protocol.decode_tensors(payload)
    except protocol.ProtocolError:
        return None
    if [name for name, _ in tensors] != [spec.name for spec in _SPECS]:
        return None
    for (_, array), spec in zip(tensors, _SPECS):
        if array.dtype != spec.dtype or array.ndim != len(spec.shape):
            return None
        if any(d is not None and d != n for d, n in zip(spec.shape, array.shape)):
            return None
    return [array for _, array in tensors]


def test_known_tensors_encode_like_tensor_parts_and_decode_like_the_general_path() -> None:
    known = protocol.KnownTensors(_SPECS)
    tensors = [("h", np.arange(12, dtype=np.float32).reshape(3, 4)), ("ids", np.arange(3, dtype=np.int64))]
    parts = known.parts(tensors)
    assert parts is not None
    assert b"".join(parts) == b"".join(protocol.tensor_parts(tensors))
    assert np.shares_memory(np.frombuffer(parts[1], np.float32), tensors[0][1])  # data not copied
    decoded = known.decode(bytearray(b"".join(parts)))
    assert decoded is not None
    for (_, sent), got in zip(tensors, decoded):
        assert got.dtype == sent.dtype and np.array_equal(got, sent)
    # What does not fit the specs exactly is left to the general path (None), never sent wrongly.
    assert known.parts([("h", tensors[0][1]), ("other", tensors[1][1])]) is None
    assert known.parts([("h", tensors[0][1].astype(np.float64)), tensors[1]]) is None
    assert known.parts([("h", tensors[0][1].T), tensors[1]]) is None  # not C-ordered
    assert known.parts([("h", np.zeros((3, 5), np.float32)), tensors[1]]) is None  # fixed dim 4
    assert known.parts(tensors[:1]) is None


def test_known_tensors_accept_no_damaged_request_the_general_path_refuses() -> None:
    """Every one-byte change of a valid request, and every truncation or extension: the fast
    decoder either refuses it or returns exactly what the general path accepts. Control: the
    fast decoder does accept the undamaged request and some damaged ones (changed data)."""
    known = protocol.KnownTensors(_SPECS)
    valid = protocol.encode_tensors([("h", np.ones((2, 4), np.float32)), ("ids", np.arange(2, dtype=np.int64))])
    assert known.decode(bytearray(valid)) is not None
    accepted = 0
    variants = [valid[:cut] for cut in range(len(valid))] + [valid + b"\x00", valid + valid]
    for index in range(len(valid)):
        for value in (0x00, 0x01, 0x04, 0x7F, 0xFF, valid[index] ^ 0x20):
            variants.append(valid[:index] + bytes([value]) + valid[index + 1 :])
    for payload in variants:
        fast, general = known.decode(bytearray(payload)), _general(payload)
        if fast is not None:
            accepted += 1
            assert general is not None, payload
            assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(fast, general))
            assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(fast, general))
    assert accepted > len(valid)  # the data bytes may change freely


@pytest.mark.parametrize("empty", [0, 1, 2], ids=["first-empty", "last-empty", "both-empty"])
def test_known_tensors_carry_empty_tensors_like_the_general_codec(empty: int) -> None:
    """A zero-size tensor has no data part: its header travels with the next one (or last). The
    bytes equal tensor_parts' and decode back; the decoder then refuses a trailing byte and a
    missing one. Control: the same layout with data in both tensors takes the same paths."""
    known = protocol.KnownTensors(_SPECS)
    h = np.zeros((0, 4), np.float32) if empty in (0, 2) else np.ones((2, 4), np.float32)
    ids = np.zeros((0,), np.int64) if empty in (1, 2) else np.arange(3, dtype=np.int64)
    for tensors in ([("h", h), ("ids", ids)], [("h", np.ones((1, 4), np.float32)), ("ids", np.ones(1, np.int64))]):
        parts = known.parts(tensors)
        assert parts is not None
        wire = b"".join(parts)
        assert wire == b"".join(protocol.tensor_parts(tensors))
        decoded = known.decode(bytearray(wire))
        assert decoded is not None
        assert [(a.dtype, a.shape) for a in decoded] == [(t.dtype, t.shape) for _, t in tensors]
        assert known.decode(bytearray(wire + b"\x00")) is None
        assert known.decode(bytearray(wire[:-1])) is None


def test_known_tensors_of_no_tensors_accept_exactly_an_empty_list() -> None:
    known = protocol.KnownTensors(())
    assert known.parts([]) == [protocol.encode_tensors([])]
    assert known.decode(bytearray(protocol.encode_tensors([]))) == []
    assert known.decode(bytearray(b"\x00\x00\x00")) is None  # trailing byte
    assert known.decode(bytearray(b"\x00\x01")) is None  # claims a tensor
    assert known.parts([("h", np.ones(1, np.float32))]) is None


def test_enclave_reply_path_sends_the_frame_send_would() -> None:
    """send_parts (the reply path, lengths counted by the caller) writes the same bytes as send."""
    host, enclave = socket.socketpair()
    channel = Channel(enclave.fileno(), 1 << 24)
    tensors = [("label", np.arange(5, dtype=np.int64))]
    parts = protocol.tensor_parts(tensors)
    try:
        channel.send(MsgType.RESULT, 9, parts)
        channel.send_parts(MsgType.RESULT, 9, parts, sum(map(len, parts)))
        one = b"".join(protocol.frame_parts(MsgType.RESULT, 9, parts))
        received = b""
        while len(received) < 2 * len(one):
            received += host.recv(65536)
        assert received == one + one
    finally:
        host.close()
        enclave.close()


def test_enclave_channel_send_survives_partial_writes() -> None:
    host, enclave = socket.socketpair()
    enclave.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    channel = Channel(enclave.fileno(), 1 << 24)
    data = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)  # 256 KiB
    parts = protocol.tensor_parts([("r", data)])
    expected = b"".join(protocol.frame_parts(MsgType.RESULT, 5, parts))
    received = bytearray()

    def drain() -> None:
        while len(received) < len(expected):
            received.extend(host.recv(65536))

    reader = threading.Thread(target=drain)
    reader.start()
    channel.send(MsgType.RESULT, 5, parts)
    reader.join(timeout=30)
    host.close()
    enclave.close()
    assert bytes(received) == expected
