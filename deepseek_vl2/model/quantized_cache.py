"""Quantized language-model weights kept on disk (DEEPSEEK_VL2_QUANTIZED_CACHE), so that only the
first start with a quantization mode pays for quantizing.

`fill_with_cache` wraps a model's loading: on a hit the quantized weights are read from the cache
file and the loader fills only the other tensors (vision, embeddings, norms...); on a miss the
loader quantizes as usual and the result is written for the next start.

A file holds one model's quantized weights under a key of everything they depend on: the weights'
identity (`checkpoint_identity`, or the random weights' config and seed), the mode and group size
(`QuantizeSpec.name`), the dtype of the scales and products, and FORMAT_VERSION.

File format (all integers little-endian):

    b"DSVL2QW\\n"            magic, 8 bytes
    u64 H                    length of the header
    header                   H bytes of UTF-8 JSON: {"format", "key", "spec", "dtype",
                             "tensors": [{"name", "dtype", "shape"}...], "payload_bytes"}
    payload                  each tensor's bytes in header order, C order, no padding
    digest                   32 bytes: blake2b (digest_size=32) of header + payload

Tensors, per quantized weight `<param>` in sorted order:
- `<param>.q`: int8 values [*lead, out, in] as stored; for int4 the canonical nibbles [*lead,
  padded_out, in / 2] uint8, byte j of a row = column 2j in its low nibble and column 2j + 1 in its
  high one. torch's CPU pack op lays int4 out differently per kernel level (int4_layout.py), so the
  file holds this level-free order and a load repacks it with `int4_layout.pack_int4_cpu` at the
  level in use (on CUDA with torch's CUDA pack op: UNVERIFIED, no GPU was available).
- `<param>.scale`: the scales (int4: and zero points) as stored, which no level lays out.

A file that is missing, foreign (another key, format or shape), truncated or corrupt (the digest)
is a miss: one warning (none for a missing file), then the weights are quantized and the file
rewritten. Files are written to a unique temporary file in the same folder and renamed into place,
so a reader never sees half a file and two processes starting at once each write their own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..compute import int4_layout
from ..compute.quantized import QUANTIZE_CHUNK_ROWS, Int4Weight, QuantizedWeight, cuda_inner_k_tiles
from .quantized_modules import QuantizedModule

log = logging.getLogger(__name__)

# Bump on any change to the file format, to the canonical int4 order, or to how weights are
# quantized (compute/quantized.py: rounding, scales, padding, group fitting): files of another
# version are then foreign, never loaded.
FORMAT_VERSION = 1
MAGIC = b"DSVL2QW\n"
DIGEST_BYTES = 32
SUFFIX = ".qweights"
DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float32": torch.float32}  # fmt: skip
READ_CHUNK = 64 << 20  # bytes read (and hashed) at a time for tensors read in place


class CacheMismatch(Exception):
    """The file is not a usable cache for this model (the reason is the message)."""


def cache_key(weights_id: str, spec_name: str, dtype: torch.dtype) -> str:
    text = f"format={FORMAT_VERSION};weights={weights_id};spec={spec_name};dtype={dtype_name(dtype)}"
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cache_file(directory: Path, weights_id: str, spec_name: str, dtype: torch.dtype) -> Path:
    return Path(directory) / f"{spec_name}-{dtype_name(dtype)}-{cache_key(weights_id, spec_name, dtype)}{SUFFIX}"


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """The model's quantized weights by parameter name, in the file's (sorted) order."""
    found = {
        f"{module_name}.{name}": weight
        for module_name, module in model.named_modules()
        if isinstance(module, QuantizedModule)
        for name, weight in module.quantized_weights().items()
    }
    return dict(sorted(found.items()))


def fill_with_cache(
    model: nn.Module, weights_id: str, directory: Path | None, fill: Callable[[bool], None]
) -> str:
    """Fill `model` (materialised, quantized by `quantize_model`): `fill(skip_quantized)` loads
    every tensor, or with True all but the quantized weights, which then come from the cache file
    in `directory` (None: no cache). Returns "hit", "miss" or "off"."""
    weights = quantized_weights(model)
    spec = model.quantization
    if directory is None or not weights:
        fill(False)
        return "off"
    dtype = next(iter(weights.values())).dtype
    path = cache_file(directory, weights_id, spec.name, dtype)
    key = cache_key(weights_id, spec.name, dtype)
    started = time.perf_counter()
    if path.is_file():
        try:
            repack_s = read_cache(path, weights, key)
        except (CacheMismatch, OSError, ValueError, RuntimeError) as error:
            log.warning("quantized weights cache %s is unusable (%s): quantizing again and rewriting it", path, error)
        else:
            read_s = time.perf_counter() - started
            fill(True)
            log.info(
                "quantized weights cache hit (%s): read %s in %.1f s (%.1f s of it repacking int4), loaded the "
                "other tensors, %.1f s in all", spec.name, path, read_s, repack_s, time.perf_counter() - started,
            )  # fmt: skip
            return "hit"
    log.info("quantized weights cache miss (%s): quantizing while loading", spec.name)
    fill(False)
    loaded = time.perf_counter()
    try:
        written = write_cache(path, weights, key, spec.name)
    except OSError as error:
        log.warning("could not write the quantized weights cache %s (%s); the next start quantizes again", path, error)
    else:
        if written:
            log.info(
                "quantized weights cache miss: loaded and quantized in %.1f s, wrote %s (%.1f MiB) in %.1f s",
                loaded - started, path, path.stat().st_size / 2**20, time.perf_counter() - loaded,
            )  # fmt: skip
    return "miss"


# ---- writing -----------------------------------------------------------------------------------


def _entries(weights: dict[str, QuantizedWeight]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor the file holds, in order."""
    entries = []
    for param, weight in weights.items():
        if isinstance(weight, Int4Weight):
            q_shape = (*weight.lead, weight.padded_out, weight.in_features // 2)
            entries.append((f"{param}.q", torch.uint8, q_shape))
        else:
            entries.append((f"{param}.q", weight.data.dtype, tuple(weight.data.shape)))
        entries.append((f"{param}.scale", weight.scale.dtype, tuple(weight.scale.shape)))
    return entries


def _matrices(weight: QuantizedWeight) -> Iterator[tuple[int, ...]]:
    """Every lead index of a weight, in C order."""
    yield from itertools.product(*(range(n) for n in weight.lead))


def canonical_int4(weight: Int4Weight, lead: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    """Rows start..stop (whole blocks of the kernel layout) of the matrix at `lead`, unpacked from
    this process's CPU layout into the canonical nibbles [rows, in / 2] uint8."""
    layout = int4_layout.cpu_int4_layout(weight.in_features)
    s, k = layout.block_rows, weight.in_features
    packed = weight.data[lead][start:stop].view((stop - start) // s, k, s // 2)
    q = torch.empty((stop - start) // s, k, s, dtype=torch.uint8)
    nibbles = layout.by_nibble(q)  # [block, column, nibble, byte]
    nibbles[..., 0, :] = packed & 15
    nibbles[..., 1, :] = packed >> 4
    rows = q.permute(0, 2, 1).reshape(stop - start, k)
    return rows[:, 0::2] | rows[:, 1::2] << 4


def _chunks(param: str, weight: QuantizedWeight, name: str) -> Iterator[torch.Tensor]:
    """The bytes of entry `name` of `weight`, as CPU tensors in file order."""
    if name.endswith(".scale") or not isinstance(weight, Int4Weight):
        tensor = weight.scale if name.endswith(".scale") else weight.data
        flat = tensor.reshape(-1)
        step = max(1, READ_CHUNK // tensor.element_size())
        for first in range(0, flat.numel(), step):
            yield flat[first : first + step].cpu()
        return
    for lead in _matrices(weight):
        for start in range(0, weight.padded_out, QUANTIZE_CHUNK_ROWS):
            yield canonical_int4(weight, lead, start, min(start + QUANTIZE_CHUNK_ROWS, weight.padded_out))


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_cache(path: Path, weights: dict[str, QuantizedWeight], key: str, spec_name: str) -> bool:
    """Write the file atomically; False (and nothing written) when the weights cannot be stored:
    int4 on CUDA, whose packed layout is not unpacked here."""
    if any(isinstance(w, Int4Weight) and w.device.type != "cpu" for w in weights.values()):
        log.info("quantized weights cache: int4 on %s is not written (only read)", next(iter(weights.values())).device)
        return False
    entries = _entries(weights)
    header = json.dumps({
        "format": FORMAT_VERSION, "key": key, "spec": spec_name,
        "dtype": dtype_name(next(iter(weights.values())).dtype),
        "tensors": [{"name": n, "dtype": dtype_name(d), "shape": list(s)} for n, d, s in entries],
        "payload_bytes": sum(_nbytes(d, s) for _, d, s in entries),
    }).encode()  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temporary = path.with_name(f".{path.name}.{_writer_tag()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        digest = hashlib.blake2b(header, digest_size=DIGEST_BYTES)
        with open(temporary, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for param, weight in weights.items():
                for name in (f"{param}.q", f"{param}.scale"):
                    for chunk in _chunks(param, weight, name):
                        data = _as_bytes(chunk)
                        digest.update(data)
                        f.write(data)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return True


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * torch.empty((), dtype=dtype).element_size()


def _writer_tag() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}"


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of this key left by processes of this host that no longer run (a killed
    first start), which would otherwise hold the disk."""
    host = socket.gethostname()
    for temporary in path.parent.glob(f".{path.name}.{host}.*.tmp"):
        try:
            pid = int(temporary.name[len(f".{path.name}.{host}.") :].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            temporary.unlink(missing_ok=True)
        except (ValueError, OSError):
            continue


# ---- reading -----------------------------------------------------------------------------------


def read_cache(path: Path, weights: dict[str, QuantizedWeight], key: str) -> float:
    """Fill `weights` from the file at `path`, or raise CacheMismatch (the weights may then be
    partly overwritten: the caller quantizes them all again). Returns the seconds spent repacking
    int4 into the kernel's layout."""
    entries = _entries(weights)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = f.read(len(MAGIC) + 8)
        if len(start) < len(MAGIC) + 8 or start[: len(MAGIC)] != MAGIC:
            raise CacheMismatch("not a quantized weights file")
        (header_bytes,) = struct.unpack("<Q", start[len(MAGIC) :])
        if header_bytes > min(size, 1 << 30):
            raise CacheMismatch("truncated or corrupt header")
        raw = f.read(header_bytes)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CacheMismatch(f"corrupt header: {error}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            raise CacheMismatch(f"format {header.get('format') if isinstance(header, dict) else '?'}, expected {FORMAT_VERSION}")
        if header.get("key") != key:
            raise CacheMismatch("written for other weights, mode or dtype (key)")
        expected = [{"name": n, "dtype": dtype_name(d), "shape": list(s)} for n, d, s in entries]
        if header.get("tensors") != expected:
            raise CacheMismatch("its tensors are not this model's")
        payload = sum(_nbytes(d, s) for _, d, s in entries)
        if header.get("payload_bytes") != payload or size != len(start) + header_bytes + payload + DIGEST_BYTES:
            raise CacheMismatch(f"{size} bytes, expected {len(start) + header_bytes + payload + DIGEST_BYTES} (truncated?)")
        digest = hashlib.blake2b(raw, digest_size=DIGEST_BYTES)
        repack_s = 0.0
        for param, weight in weights.items():
            repack_s += _read_q(f, digest, weight)
            _read_into(f, digest, weight.scale)
        if f.read(DIGEST_BYTES) != digest.digest():
            raise CacheMismatch("checksum mismatch (corrupt)")
    return repack_s


def _read_exact(f, digest, buffer: memoryview) -> None:
    if f.readinto(buffer) != len(buffer):
        raise CacheMismatch("truncated payload")
    digest.update(buffer)


def _read_into(f, digest, tensor: torch.Tensor) -> None:
    """Read a tensor's bytes in place (CPU), or through a host buffer (another device)."""
    flat = tensor.view(-1)
    step = max(1, READ_CHUNK // tensor.element_size())
    for first in range(0, flat.numel(), step):
        part = flat[first : first + step]
        host = part if part.device.type == "cpu" else torch.empty(part.shape, dtype=part.dtype)
        _read_exact(f, digest, memoryview(host.view(torch.uint8).numpy()))
        if host is not part:
            part.copy_(host)


def _read_q(f, digest, weight: QuantizedWeight) -> float:
    """Read a weight's values; the seconds spent repacking int4."""
    if not isinstance(weight, Int4Weight):
        _read_into(f, digest, weight.data)
        return 0.0
    k, repack_s = weight.in_features, 0.0
    for lead in _matrices(weight):
        data = weight.data[lead]
        for start in range(0, weight.padded_out, QUANTIZE_CHUNK_ROWS):
            stop = min(start + QUANTIZE_CHUNK_ROWS, weight.padded_out)
            nibbles = torch.empty(stop - start, k // 2, dtype=torch.uint8)
            _read_exact(f, digest, memoryview(nibbles.numpy()).cast("B"))
            started = time.perf_counter()
            if weight.device.type == "cuda":  # torch's CUDA layout takes column 2j in the high nibble
                swapped = (nibbles << 4 | nibbles >> 4).to(weight.device)
                data[start // 8 : stop // 8] = torch._convert_weight_to_int4pack(swapped, cuda_inner_k_tiles(k))
            else:
                q = torch.empty(stop - start, k, dtype=torch.int32)
                q[:, 0::2] = nibbles & 15
                q[:, 1::2] = nibbles >> 4
                data[start:stop] = int4_layout.pack_int4_cpu(q)
            repack_s += time.perf_counter() - started
    return repack_s
