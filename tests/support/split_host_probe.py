"""Host side of a split bundle, run as its own process so a test can read its memory.

Usage: split_host_probe.py BUNDLE HOST_KEY ENCLAVE_KEY MODE [PRIVATE_MODEL]
MODE "clean" loads and runs the bundle; MODE "leak" also reads the private part's plain ONNX file
into this process, the negative control the memory scan must catch. Prints "ready PID" and waits
for a line on stdin before exiting, so the scan sees the process as it is after serving queries.
"""

import os
import sys

import numpy as np

from modelcloak.inference import load
from modelcloak.keys import KeyFile


def main() -> None:
    bundle, host_key, enclave_key, mode = sys.argv[1:5]
    leaked = open(sys.argv[5], "rb").read() if mode == "leak" else b""  # noqa: SIM115 - kept alive on purpose
    with load(bundle, key=KeyFile(host_key), enclave_key_file=enclave_key) as session:
        for batch in (1, 4):
            session.run(np.ones((batch, 64), np.float32))
        print("ready", os.getpid(), session.enclave.pid, len(leaked), flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    main()
