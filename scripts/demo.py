#!/usr/bin/env python3
"""`make demo`: start the Cog HTTP server on the demo checkpoint, send one request, print the reply.

The demo checkpoint (weights/demo, built by scripts/make_demo_checkpoint.py) has RANDOM weights:
the request and response are real, the answer text is noise. Point DEEPSEEK_VL2_WEIGHTS at a real
checkpoint to get a real answer.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from deepseek_vl2.serving.local_server import LocalCogServer, ServerError  # noqa: E402
from deepseek_vl2.serving.weights import WEIGHTS_ENV, is_checkpoint_dir, is_demo_checkpoint  # noqa: E402

EXAMPLE_IMAGE = PROJECT_ROOT / "examples" / "vqa_1.jpg"
EXAMPLE_TEXT = "Describe each stage of this image in detail"


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def main() -> int:
    weights = Path(os.environ.get(WEIGHTS_ENV) or PROJECT_ROOT / "weights" / "demo")
    if not is_checkpoint_dir(weights):
        print(f"No checkpoint in {weights}: run `make demo` (it builds one).", file=sys.stderr)
        return 1
    if is_demo_checkpoint(weights):
        print(f"NOTE: {weights} holds random weights; the answer below is noise.", file=sys.stderr)

    print(f"Starting the Cog server with {WEIGHTS_ENV}={weights} ...", file=sys.stderr)
    try:
        with LocalCogServer({WEIGHTS_ENV: str(weights.resolve())}) as server:
            print(f"Server READY at {server.base_url}; POST /predictions ...", file=sys.stderr)
            status, body = server.predict({"image1": data_uri(EXAMPLE_IMAGE), "text": EXAMPLE_TEXT})
    except ServerError as error:
        print(f"The server failed: {error}", file=sys.stderr)
        return 1

    print(json.dumps(body, indent=2, ensure_ascii=False))
    if status != 200 or body.get("status") != "succeeded":
        print(f"The prediction did not succeed (HTTP {status}).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
