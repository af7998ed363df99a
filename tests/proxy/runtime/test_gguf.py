"""The GGUF header reader and the memory estimate, checked against what the pinned llama-server
logs for the bundled model, and against small crafted files: truncated, lying about their
lengths, or carrying big arrays that must be skipped without being read into memory."""

from __future__ import annotations

import re
import struct
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest

from config.paths import bundled_llama_server, bundled_model
from proxy.runtime.gguf import (
    MIB,
    OVERHEAD_MIB,
    context_length,
    footprint_mib,
    kv_cache_bytes,
    read_metadata,
)
from tests.kit.helpers import free_port, wait_until

KV_SIZE = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB")
# "llama_model_loader: - kv  9:   llama.block_count u32   = 30"
LOGGED_KV = re.compile(r"- kv\s+\d+:\s+(\S+)\s+(\S+)\s+= (.*)$", re.M)


def model() -> Path:
    path = bundled_model()
    assert path, "run `make install` first: the bundled model is missing"
    return path


def llama_server_log(work: Path, *args: str) -> str:
    """Start the pinned llama-server on the bundled model just long enough to log its model and
    its KV cache (-lv 4: the default verbosity logs neither), then stop it."""
    binary = bundled_llama_server()
    assert binary, "run `make install` first: llama-server is missing"
    log = work / f"llama-{free_port()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), "--model", str(model()), "--host", "127.0.0.1", "--port",
             str(free_port()), "--no-webui", "-lv", "4", *args],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or KV_SIZE.search(log.read_text("utf-8",
                                                                                  "replace")),
                   60, "llama-server to log its KV cache")
    finally:
        proc.terminate()
        proc.wait(10)
    return log.read_text("utf-8", "replace")


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> str:
    return llama_server_log(tmp_path_factory.mktemp("gguf"), "--ctx-size", "2048",
                            "--parallel", "1")


def test_the_bundled_models_metadata_is_what_llama_server_reads(logged: str) -> None:
    meta = read_metadata(model())
    assert meta["general.architecture"] == "llama"
    shape = ("block_count", "attention.head_count", "attention.head_count_kv",
             "embedding_length")
    assert [meta[f"llama.{key}"] for key in shape] == [30, 9, 3, 576]
    assert context_length(meta) == 8192
    assert meta["tokenizer.ggml.tokens"] == 49152  # an array: only its count is kept
    assert f"loaded meta data with {len(meta)} key-value pairs" in logged
    pairs = LOGGED_KV.findall(logged)
    assert len(pairs) == len(meta)
    for key, kind, shown in pairs:
        value = meta[key]
        if kind.startswith("arr["):
            assert value == int(kind.rstrip("]").split(",")[1]), key
        elif kind == "str":
            assert shown.endswith("...") or value == shown, key
            assert str(value).startswith(shown.removesuffix("...")), key
        elif kind == "bool":
            assert value is (shown == "true"), key
        elif kind == "f32":
            assert value == pytest.approx(float(shown), abs=1e-6), key
        else:
            assert value == int(shown), key


@pytest.mark.parametrize(("args", "ctx_size", "parallel", "bytes_per_element"), [
    ((), 2048, 1, 2.0),
    (("-ctk", "q8_0", "-ctv", "q8_0"), 2048, 1, 34 / 32),  # q8_0: 32 elements in 34 bytes
    ((), 1000, 3, 2.0),  # 333 a slot, rounded up to 512
    ((), 0, 2, 2.0),  # no --ctx-size: the model's 8192 for each slot
])
def test_the_kv_cache_estimate_is_what_llama_server_allocates(
        tmp_path: Path, logged: str, args: tuple[str, ...], ctx_size: int, parallel: int,
        bytes_per_element: float) -> None:
    if (args, ctx_size, parallel) == ((), 2048, 1):
        log = logged
    else:
        sized = ("--ctx-size", str(ctx_size)) if ctx_size else ()
        log = llama_server_log(tmp_path, *sized, "--parallel", str(parallel), *args)
    logged_mib = float(KV_SIZE.findall(log)[-1])
    estimate = kv_cache_bytes(read_metadata(model()), ctx_size, bytes_per_element,
                              parallel=parallel)
    assert estimate / MIB == pytest.approx(logged_mib, abs=0.01)


def test_kv_cache_defaults_and_missing_facts() -> None:
    meta: dict[str, object] = {"general.architecture": "x", "x.block_count": 2,
                               "x.attention.head_count": 4, "x.embedding_length": 64}
    assert kv_cache_bytes(meta, 256) == 2 * 256 * 4 * (16 + 16) * 2  # kv heads = heads
    meta |= {"x.attention.head_count_kv": 1, "x.attention.key_length": 8,
             "x.attention.value_length": 24}
    assert kv_cache_bytes(meta, 512, 4.0) == 2 * 512 * 1 * (8 + 24) * 4
    assert kv_cache_bytes(meta, 1) == kv_cache_bytes(meta, 256)  # whole 256-token blocks
    assert context_length(meta) is None
    with pytest.raises(ValueError, match="context_length"):
        kv_cache_bytes(meta, 0)
    assert kv_cache_bytes(meta | {"x.context_length": 1024}, 0, parallel=2) == kv_cache_bytes(
        meta, 2048, parallel=2)
    with pytest.raises(ValueError, match=r"x\.block_count"):
        kv_cache_bytes(meta | {"x.block_count": True}, 256)
    with pytest.raises(ValueError, match=r"general\.architecture"):
        kv_cache_bytes({}, 256)
    assert context_length({}) is None


def test_the_footprint_grows_with_the_context_and_the_prompt_cache(tmp_path: Path) -> None:
    path = model()
    small = footprint_mib(path, 2048, 0)
    assert small == -(-path.stat().st_size // MIB) + 45 + OVERHEAD_MIB
    assert footprint_mib(path, 8192, 0) == small + 135
    assert footprint_mib(path, 2048, 256) == small + 256
    assert footprint_mib(path, 0, 0, parallel=2) == footprint_mib(path, 16384, 0, parallel=2)
    assert footprint_mib(path, 0, 0, parallel=2) > footprint_mib(path, 0, 0)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * (3 * MIB))
    assert footprint_mib(junk, 8192, 64) == 3 + 64 + OVERHEAD_MIB


# Crafted files ---------------------------------------------------------------------------

def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, kind: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", kind) + payload


def gguf(*pairs: bytes, count: int | None = None, magic: bytes = b"GGUF",
         version: int = 3) -> bytes:
    head = magic + struct.pack("<IQQ", version, 0, len(pairs) if count is None else count)
    return head + b"".join(pairs)


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    return path


def rejected(path: Path, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match=match):
        read_metadata(path)
    assert time.monotonic() - started < 0.5


SAMPLE = gguf(
    kv("general.architecture", 8, s("llama")),
    kv("u8", 0, b"\xff"), kv("i8", 1, b"\xff"), kv("u16", 2, struct.pack("<H", 65535)),
    kv("i16", 3, struct.pack("<h", -2)), kv("u32", 4, struct.pack("<I", 7)),
    kv("i32", 5, struct.pack("<i", -7)), kv("f32", 6, struct.pack("<f", 0.5)),
    kv("bool", 7, b"\x01"), kv("u64", 10, struct.pack("<Q", 2**40)),
    kv("i64", 11, struct.pack("<q", -(2**40))), kv("f64", 12, struct.pack("<d", 0.25)),
    kv("ids", 9, struct.pack("<IQ", 4, 3) + struct.pack("<3I", 1, 2, 3)),
    kv("words", 9, struct.pack("<IQ", 8, 2) + s("ab") + s("")),
    kv("last", 8, s("é")),
)


def test_every_scalar_type_is_read_and_arrays_are_counted(tmp_path: Path) -> None:
    assert read_metadata(write(tmp_path, SAMPLE)) == {
        "general.architecture": "llama", "u8": 255, "i8": -1, "u16": 65535, "i16": -2,
        "u32": 7, "i32": -7, "f32": 0.5, "bool": True, "u64": 2**40, "i64": -(2**40),
        "f64": 0.25, "ids": 3, "words": 2, "last": "é"}


def test_a_file_cut_anywhere_in_its_header_is_refused(tmp_path: Path) -> None:
    for end in range(len(SAMPLE)):
        with pytest.raises(ValueError):
            read_metadata(write(tmp_path, SAMPLE[:end]))
    with model().open("rb") as f:
        head = f.read(400_000)  # into the tokenizer's vocabulary
    rejected(write(tmp_path, head), "truncated")


def test_not_gguf_or_an_unknown_version_is_refused(tmp_path: Path) -> None:
    rejected(write(tmp_path, b"GGML" + SAMPLE[4:]), "magic")
    rejected(write(tmp_path, gguf(version=1)), "version 1")
    rejected(write(tmp_path, gguf(kv("x", 13, b""))), "value type 13")
    rejected(write(tmp_path, gguf(kv("x", 9, struct.pack("<IQ", 9, 1)))), "element type 9")


def test_lying_lengths_and_counts_are_refused_without_allocating(tmp_path: Path) -> None:
    rejected(write(tmp_path, gguf(count=2**64 - 1)), "key/value count")
    rejected(write(tmp_path, gguf(struct.pack("<Q", 2**63) + b"key")), "string length")
    rejected(write(tmp_path, gguf(kv("k", 8, struct.pack("<Q", 2**40) + b"v"))),
             "string length")
    rejected(write(tmp_path, gguf(kv("k", 9, struct.pack("<IQ", 4, 2**62)))), "array length")
    words = struct.pack("<IQ", 8, 2) + s("ok") + struct.pack("<Q", 2**50)
    rejected(write(tmp_path, gguf(kv("k", 9, words))), "string length")


def test_a_big_declared_array_in_a_short_file_is_refused_at_once(tmp_path: Path) -> None:
    ten_million = struct.pack("<IQ", 4, 10_000_000) + b"\0" * 1000
    rejected(write(tmp_path, gguf(kv("k", 9, ten_million))), "truncated")
    strings = struct.pack("<IQ", 8, 10_000_000) + s("a") * 1000
    rejected(write(tmp_path, gguf(kv("k", 9, strings))), "truncated")


def test_a_vocabulary_of_100k_strings_is_skipped_quickly_and_not_held(tmp_path: Path) -> None:
    vocab = b"".join(s(f"token{i}") for i in range(100_000))  # about 1.8 MB
    path = write(tmp_path, gguf(kv("vocab", 9, struct.pack("<IQ", 8, 100_000) + vocab),
                                kv("after", 4, struct.pack("<I", 42))))
    started = time.monotonic()
    assert read_metadata(path) == {"vocab": 100_000, "after": 42}
    assert time.monotonic() - started < 0.5
    tracemalloc.start()  # slows the read several times over: timed above, without it
    try:
        read_metadata(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024  # a 64 KiB window at a time, not the 1.8 MB array
