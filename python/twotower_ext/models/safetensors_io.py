"""A small memory-mapped safetensors reader and writer (no dependency on the `safetensors` package).

Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin,
end]}, "__metadata__": {...}}, then the raw little-endian tensor bytes (offsets relative to the end of the
header). The reader maps the file privately (copy-on-write, so torch gets a writable buffer without a
copy) and hands out zero-copy tensor views; `copy_into` streams a view into a preallocated tensor of any
dtype/device in bounded chunks and drops the source pages it has read, so loading never holds a second
full copy of the checkpoint in host memory.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}

_PAGE = mmap.PAGESIZE
COPY_CHUNK_BYTES = 16 << 20  # source bytes per copy step: bounds staging memory for dtype/device changes


class SafetensorsError(ValueError):
    """A safetensors file is malformed (bad header, unknown dtype, offsets out of range)."""


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name, dtype, shape, begin, end):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, tuple(shape), begin, end

    def __repr__(self):
        return f"TensorInfo({self.name}, {self.dtype}, {list(self.shape)})"


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict, int]:
    """(tensors by name, __metadata__, absolute offset of the data section) of one file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not JSON: {e}") from None
    data_start, data_len = 8 + n, size - 8 - n
    meta = header.pop("__metadata__", None) or {}
    infos = {}
    for name, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = [int(s) for s in h["shape"]]
            begin, end = (int(o) for o in h["data_offsets"])
        except KeyError as e:
            raise SafetensorsError(f"{path}: tensor {name!r}: unknown dtype or missing field {e}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or end > data_len:
            raise SafetensorsError(f"{path}: tensor {name!r} offsets {[begin, end]} do not fit its "
                                   f"{h['dtype']}{shape} ({nbytes} bytes) in {data_len} data bytes")
        infos[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    return infos, meta, data_start


class SafetensorsFile:
    """One memory-mapped file. `get(name)` is a zero-copy CPU view; close() unmaps (views must be gone)."""

    def __init__(self, path: str):
        self.path = path
        self.tensors, self.metadata, _ = read_header(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def keys(self):
        return self.tensors.keys()

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.end == info.begin:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=info.end - info.begin, offset=info.begin)
        return flat.view(info.dtype).view(info.shape)

    def copy_to(self, name: str, dst: torch.Tensor, chunk_bytes: int = COPY_CHUNK_BYTES) -> None:
        """dst.copy_(tensor `name`) in chunks, dropping each chunk's resident source pages as soon as it is
        copied (they are re-read from disk if ever needed), so host memory holds at most one chunk."""
        begin = self.tensors[name].begin
        copy_into(dst, self.get(name), chunk_bytes, lambda lo, hi: self._release(begin + lo, begin + hi))

    def row_chunks(self, name: str, rows_multiple: int = 1, chunk_bytes: int = COPY_CHUNK_BYTES):
        """Tensor `name` (at least 1-D) as zero-copy views of consecutive row blocks: yields (first row, rows),
        each block a multiple of `rows_multiple` rows (but the last) and about chunk_bytes; a block's resident
        source pages are dropped once the consumer asks for the next one (as in copy_to)."""
        t, begin = self.get(name), self.tensors[name].begin
        row_bytes = max(1, t[0].numel() * t.element_size()) if len(t) else 1
        step = max(rows_multiple, chunk_bytes // row_bytes // rows_multiple * rows_multiple)
        for r in range(0, len(t), step):
            yield r, t[r:r + step]
            self._release(begin + r * row_bytes, begin + min(len(t), r + step) * row_bytes)

    def _release(self, lo: int, hi: int) -> None:
        # Whole pages around the range: the mapping is never written, so a dropped page that also holds
        # bytes of a neighbouring tensor is simply read back from the file when that tensor is copied.
        if self._mm is None:
            return
        lo, hi = lo // _PAGE * _PAGE, min(len(self._mm), -(-hi // _PAGE) * _PAGE)
        if hi > lo and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive: the mapping goes when the last view does
                pass
            self._mm = None


def copy_into(dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int = COPY_CHUNK_BYTES, done=None) -> None:
    """dst.copy_(src) in chunks of about chunk_bytes source bytes (dst contiguous; any dtype/device);
    done(byte_lo, byte_hi) is called with each chunk's source byte range once it has been copied."""
    if dst.shape != src.shape:
        raise ValueError(f"copy_into: shape {tuple(src.shape)} into {tuple(dst.shape)}")
    if not dst.is_contiguous():
        raise ValueError("copy_into: dst must be contiguous")
    d, s = dst.view(-1), src.reshape(-1)
    size = src.element_size()
    step = max(1, chunk_bytes // size)
    for i in range(0, s.numel(), step):
        d[i:i + step].copy_(s[i:i + step])
        if done is not None:
            done(i * size, min(s.numel(), i + step) * size)


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """Write tensors (any device; copied to CPU one at a time) as a safetensors file."""
    header, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in NAMES:
            raise SafetensorsError(f"save_file: {name} has unsupported dtype {t.dtype}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(tensors):
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
