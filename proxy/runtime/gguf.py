"""A GGUF model file's header metadata, and the memory a llama-server child will need for it.

The appliance reads this before it starts a llama-server, to size the child (and refuse what the
machine cannot hold) without loading the model. Only the header's key/value section is read,
never the tensor data; arrays (a tokenizer's vocabulary: hundreds of thousands of strings) are
skipped by seeking, and every length a file declares is bounded, so a corrupt or hostile file
raises ValueError quickly instead of allocating gigabytes or looping for ever.

Standard library only: nothing of the appliance is imported here.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 used 32-bit counts and lengths; every current file is v3
MAX_KV_COUNT = 65_536  # real headers have a few dozen keys
MAX_STRING_BYTES = 1 << 20  # a single scalar string (a chat template is a few KiB)
MAX_ARRAY_COUNT = 1 << 26  # 67M elements: more than any vocabulary or merge list
MAX_ARRAY_STRING_BYTES = 1 << 16  # one token in a vocabulary array
READ_CHUNK = 1 << 16  # how much of a string array is held at a time while skipping it

MIB = 1 << 20
# What a llama-server child holds besides the model file (mapped, and all of it resident once it
# has served), its KV cache and its prompt cache: the compute buffers, the tokenizer, the HTTP
# server, the binary and its libraries. Measured on the pinned build with the bundled
# SmolLM2-135M Q4_1 (98,362,432 bytes = 93.8 MiB) on CPU: VmRSS from /proc/<pid>/status after
# one 1201-token completion, minus the file's size and the KV size llama-server logged:
#   --ctx-size 2048 --parallel 1: KV  45.0 MiB, VmRSS 191.9 MiB, rest 53.1 MiB
#   --ctx-size 8192 --parallel 1: KV 180.0 MiB, VmRSS 327.4 MiB, rest 53.6 MiB
#   --ctx-size 8192 --parallel 4: KV 180.0 MiB, VmRSS 328.0 MiB, rest 54.2 MiB
#   --ctx-size 2048 -ctk/-ctv q8_0: KV 23.9 MiB, VmRSS 170.8 MiB, rest 53.1 MiB
# (--cache-ram is a cap the prompt cache grows into, not resident at start: counted in full.)
# The compute buffers grow with the model's width, the batch and the vocabulary (17-23 MiB of
# the above; a few hundred MiB for 7-8B models), so this constant is a floor for big models.
OVERHEAD_MIB = 128
# llama-server rounds each slot's context up to a multiple of this (--ctx-size 1000 -> 1024
# cells, 100 -> 256; --ctx-size 1000 --parallel 3 -> 3 slots of 512).
CTX_PAD = 256

# Value types: struct format of the fixed-size ones, by type id.
STRING, ARRAY = 8, 9
FIXED: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
                         7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

Scalar = str | int | float | bool


def read_metadata(path: Path) -> dict[str, Scalar]:
    """The header's scalar key/values ("general.architecture": "llama", ...); an array is kept
    as its element count only. Raises ValueError for anything that is not a sane GGUF header."""
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        version = _unpack(f, "<I")
        if version not in VERSIONS:
            raise ValueError(f"{path}: unsupported GGUF version {version}")
        _unpack(f, "<Q")  # tensor count: the tensor infos follow the key/values, unread
        kv_count = _unpack(f, "<Q")
        if kv_count > MAX_KV_COUNT:
            raise ValueError(f"{path}: implausible key/value count {kv_count}")
        size = path.stat().st_size
        meta: dict[str, Scalar] = {}
        for _ in range(kv_count):
            key = _string(f, MAX_STRING_BYTES)
            meta[key] = _value(f, _unpack(f, "<I"), size)
        return meta


def context_length(meta: Mapping[str, object]) -> int | None:
    """The context the model was trained for (<arch>.context_length), if the header says."""
    arch = meta.get("general.architecture")
    return _positive_int(meta.get(f"{arch}.context_length")) if isinstance(arch, str) else None


def kv_cache_bytes(meta: Mapping[str, object], ctx_size: int, bytes_per_element: float = 2.0,
                   *, parallel: int = 1) -> int:
    """The K and V cache llama-server allocates, so a child can be sized before it starts.

    ctx_size is its --ctx-size, the total across its --parallel slots; each slot gets
    ctx_size // parallel tokens, rounded up to a multiple of 256. bytes_per_element is that of
    -ctk/-ctv: f16 (the default) 2, f32 4, q8_0 34/32, q4_0 18/32. A unified KV cache
    (--kv-unified, or --parallel left to auto) is one pool: pass parallel=1.

    ctx_size 0 is the model's own context (<arch>.context_length). On the pinned build
    --ctx-size defaults to 0, "loaded from model", and that is the context of each slot: with
    --parallel 2 and no --ctx-size it allocates 2 x context_length tokens (unless unified).

    Counts every layer as full attention: sliding-window layers make this an overestimate.
    """
    if ctx_size < 0 or parallel < 1:
        raise ValueError(f"need ctx_size >= 0 and parallel >= 1, not {ctx_size}, {parallel}")
    per_slot = context_length(meta) if ctx_size == 0 else ctx_size // parallel
    if per_slot is None:
        raise ValueError("ctx_size 0 needs the model's context_length, which is not stated")
    cells = -(-max(per_slot, 1) // CTX_PAD) * CTX_PAD * parallel
    arch = _arch(meta)
    layers = _required(meta, f"{arch}.block_count")
    heads = _required(meta, f"{arch}.attention.head_count")
    kv_heads = _optional(meta, f"{arch}.attention.head_count_kv", heads)
    head_dim = _required(meta, f"{arch}.embedding_length") // heads
    key_len = _optional(meta, f"{arch}.attention.key_length", head_dim)
    value_len = _optional(meta, f"{arch}.attention.value_length", head_dim)
    return int(layers * cells * kv_heads * (key_len + value_len) * bytes_per_element)


def footprint_mib(path: Path, ctx_size: int, cache_ram_mib: int, *, parallel: int = 1) -> int:
    """Estimated resident memory of a llama-server child in MiB, to check it against a budget
    before starting it: the model file (mapped whole), its f16 KV cache (see kv_cache_bytes),
    the prompt cache --cache-ram allows, and a fixed overhead. A file whose header cannot be
    read counts as its size plus the overhead; the caller decides what to say about it."""
    size = path.stat().st_size
    try:
        kv = kv_cache_bytes(read_metadata(path), ctx_size, parallel=parallel)
    except (ValueError, OSError):
        kv = 0
    return -(-(size + kv) // MIB) + max(cache_ram_mib, 0) + OVERHEAD_MIB


def _arch(meta: Mapping[str, object]) -> str:
    """The key prefix of the architecture's hyperparameters ("llama", "qwen2", ...)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError("general.architecture is missing from the metadata")
    return arch


def _positive_int(value: object) -> int | None:
    """value if it is a count (a bool is an int to Python, not to GGUF), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _required(meta: Mapping[str, object], key: str) -> int:
    value = _positive_int(meta.get(key))
    if value is None:
        raise ValueError(f"{key} is missing from the metadata or not a positive integer")
    return value


def _optional(meta: Mapping[str, object], key: str, default: int) -> int:
    return _required(meta, key) if key in meta else default


def _read(f: BinaryIO, n: int) -> bytes:
    """Exactly n bytes, or ValueError: a short read means a truncated file."""
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"truncated GGUF header at byte {f.tell()}")
    return data


def _unpack(f: BinaryIO, fmt: str) -> int:
    """One integer of the given struct format."""
    value: int = struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    return value


def _string(f: BinaryIO, limit: int) -> str:
    length = _unpack(f, "<Q")
    if length > limit:
        raise ValueError(f"implausible string length {length} at byte {f.tell() - 8}")
    return _read(f, length).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, size: int) -> Scalar:
    """One value; an array is skipped and stands for its element count."""
    if kind == STRING:
        return _string(f, MAX_STRING_BYTES)
    if kind == ARRAY:
        return _skip_array(f, size)
    fmt = FIXED.get(kind)
    if fmt is None:
        raise ValueError(f"unknown GGUF value type {kind} at byte {f.tell() - 4}")
    value: Scalar = struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    return value


def _skip_array(f: BinaryIO, size: int) -> int:
    """Seek past an array without holding it: fixed-size elements in one jump, strings one
    length at a time. Returns its element count."""
    kind, count = _unpack(f, "<I"), _unpack(f, "<Q")
    if count > MAX_ARRAY_COUNT:
        raise ValueError(f"implausible array length {count} at byte {f.tell() - 8}")
    if kind == STRING:
        if f.tell() + 8 * count > size:  # each string has at least its 8-byte length
            raise ValueError(f"truncated GGUF header: {count} strings cannot fit in the file")
        _skip_strings(f, count, size)
    elif kind in FIXED:
        _seek_within(f, count * struct.calcsize(FIXED[kind]), size)
    else:  # nested arrays do not occur in GGUF metadata; refusing them bounds the recursion
        raise ValueError(f"unsupported GGUF array element type {kind} at byte {f.tell() - 12}")
    return count


def _skip_strings(f: BinaryIO, count: int, size: int) -> None:
    """Walk count length-prefixed strings in a window of the file that slides forward: one
    unpack per string, only the lengths are looked at, and at most READ_CHUNK bytes are held."""
    pos = base = f.tell()
    window = b""
    for _ in range(count):
        if pos + 8 > base + len(window):
            f.seek(pos)
            window, base = f.read(READ_CHUNK), pos
            if len(window) < 8:
                raise ValueError(f"truncated GGUF header at byte {pos + len(window)}")
        (length,) = struct.unpack_from("<Q", window, pos - base)
        if length > MAX_ARRAY_STRING_BYTES:
            raise ValueError(f"implausible string length {length} at byte {pos}")
        pos += 8 + length
        if pos > size:
            raise ValueError(f"truncated GGUF header: a string runs to byte {pos} of {size}")
    f.seek(pos)


def _seek_within(f: BinaryIO, n: int, size: int) -> None:
    """Skip n bytes; past the end of the file means a truncated file (seek alone would not
    notice)."""
    end = f.tell() + n
    if end > size:
        raise ValueError(f"truncated GGUF header: array runs to byte {end} of {size}")
    f.seek(end)
