"""A subprocess for tests/model/test_quantized_cache.py: loads a fixture checkpoint quantized with
a quantized cache folder, then the same checkpoint quantized afresh (no cache), and prints one JSON
line: the kernel level, the cache's state ("hit", "miss", "off"), and whether every tensor of the
two models is bit-identical.

    python tests/model/quantized_cache_worker.py CHECKPOINT MODE CACHE_DIR [START_AT_UNIX_TIME]

START_AT_UNIX_TIME: sleep until then first, so that processes started one after the other load at
the same moment.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from deepseek_vl2 import DeepseekVL2  # noqa: E402
from deepseek_vl2.compute.quantized import QuantizeSpec  # noqa: E402


def main() -> None:
    checkpoint, mode, directory = sys.argv[1:4]
    if len(sys.argv) > 4:
        time.sleep(max(0.0, float(sys.argv[4]) - time.time()))
    spec = QuantizeSpec(mode)
    cached = DeepseekVL2.from_pretrained(checkpoint, dtype=torch.bfloat16, quantize=spec, quantized_cache=directory)
    fresh = DeepseekVL2.from_pretrained(checkpoint, dtype=torch.bfloat16, quantize=spec)
    a, b = cached.state_dict(), fresh.state_dict()
    equal = a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    print(json.dumps({"level": torch.backends.cpu.get_cpu_capability().lower(), "state": cached.quantized_cache, "equal": equal}))


if __name__ == "__main__":
    main()
