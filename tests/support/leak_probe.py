"""Child process for the no-plaintext-on-disk test: load a sealed bundle and run it once.

Usage: leak_probe.py BUNDLE KEYFILE BACKEND POLICY [OPTIMIZED_MODEL_PATH]
With OPTIMIZED_MODEL_PATH the probe asks onnxruntime to save its optimised model there, the way
a user (or a library default) might; the cache guard must strip that unless POLICY is "off".
"""

import sys

import numpy as np

from modelcloak.inference import load
from modelcloak.keys import KeyFile


def main() -> None:
    bundle, key_path, backend, policy = sys.argv[1:5]
    config = {"optimized_model_filepath": sys.argv[5]} if len(sys.argv) > 5 else None
    with load(bundle, key=KeyFile(key_path), backend=backend, cache_policy=policy, session_config=config) as session:
        batch = np.ones((3, 64), dtype=np.float32)
        outputs = session.run(batch)
    print("ran", {name: value.shape for name, value in outputs.items()})


if __name__ == "__main__":
    main()
