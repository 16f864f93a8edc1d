"""Streaming safetensors reading and writing, one tensor at a time.

Why not ``safetensors.torch.save_file`` / ``safe_open``: ``save_file`` needs every tensor of a file
in memory at once (and copies each to ``bytes``), so writing a 3.5 GB single-file checkpoint
costs ~7 GB; ``safe_open`` memory-maps the file, and every page it touches stays in the process's
resident set until the file is closed, so reading a whole checkpoint through it looks like
loading it all. The format is simple and fixed (8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}`` padded with spaces to 8 bytes, then the raw bytes), so
this module writes it from a header planned up front and fills the data tensor by tensor, and
reads each tensor either as a copy (``get``: positioned reads into a fresh buffer) or as a view of
its own small memory map (``view``), unmapped when the tensor is freed. A view, or a row slice of
one, that nothing has written to is written by the kernel straight from the input file
(``sendfile``), without its bytes passing through this process. Peak memory is the largest tensors
in flight, not the file. The files are ordinary safetensors files: ``safe_open`` and
``transformers`` read them (the tests check both).

Every reading error (missing file, bad header, truncated data) is a ``ConversionError`` naming
the file and what to do.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import queue
import struct
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import torch

from real_megatron.convert.mapping import ConversionError

DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_WRITE_CHUNK = 64 * 1024 * 1024  # writeback to disk is started after each chunk, not at close
T = TypeVar("T")


def _load_sync_file_range():
    """Linux's ``sync_file_range``, or None where libc lacks it (the writer then relies on the final fsync)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages; do not wait


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items``, computed on a background thread up to ``depth`` items ahead.

    A conversion is a loop of "prepare the next tensor" (map it and ask the kernel to read it ahead;
    at TP > 1, concatenate and cut it) and "write this tensor" (file writes): both release the GIL,
    so running the first on a second thread overlaps them, and a file that is not in the page cache
    yet is read while the previous tensor is written. Memory grows by at most ``depth`` tensors.
    An exception raised by ``items`` is re-raised here; if the consumer stops early, the thread
    stops after its current item.
    """
    pending: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                pending.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as err:  # handed to the consumer, which raises it
            put((None, err))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = pending.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()


class _MappedFile:
    """Where a ``SafetensorsReader.view`` tensor's bytes live: the file (its own descriptor, closed
    with the map), the file offset of the tensor's first byte, its size, and the map (weakly)."""

    __slots__ = ("fd", "offset", "size", "map_ref")

    def __init__(self, fd: int, offset: int, size: int, mapped: mmap.mmap):
        self.fd, self.offset, self.size, self.map_ref = fd, offset, size, weakref.ref(mapped)


# storage address of each live view -> _MappedFile. Written by the thread that maps (prefetch) and
# read by the one that writes, hence the lock.
_MAPPED: dict[int, _MappedFile] = {}
_MAPPED_LOCK = threading.Lock()


def _register_view(tensor: torch.Tensor, fd: int, offset: int, mapped: mmap.mmap) -> None:
    storage = tensor.untyped_storage()
    key, entry = storage.data_ptr(), _MappedFile(os.dup(fd), offset, storage.nbytes(), mapped)
    with _MAPPED_LOCK:
        _MAPPED[key] = entry
    weakref.finalize(mapped, _unregister_view, key, entry)


def _unregister_view(key: int, entry: _MappedFile) -> None:
    # mmap unmaps before it runs this, so another map may already sit at the same address and
    # have replaced the entry: remove only our own
    with _MAPPED_LOCK:
        if _MAPPED.get(key) is entry:
            del _MAPPED[key]
    os.close(entry.fd)


def file_region(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(descriptor, offset) of the file bytes equal to ``tensor``'s bytes, or None.

    Only for a contiguous CPU tensor that is (a slice of) a ``SafetensorsReader.view`` whose map is
    still alive and has not been written to: torch counts in-place writes to a tensor and all its
    views in ``_version``, which is 0 until the first one; a write to the private map would make it
    differ from the file. Anything else, such as a cast or a concatenation, is in memory only.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor._version != 0:
        return None
    storage = tensor.untyped_storage()
    with _MAPPED_LOCK:
        entry = _MAPPED.get(storage.data_ptr())
    # a dead map (refcount 0, ref() is None) may still have an entry for an instant after munmap
    if entry is None or entry.map_ref() is None or storage.nbytes() != entry.size:
        return None
    return entry.fd, entry.offset + tensor.data_ptr() - storage.data_ptr()  # a slice starts inside the storage


def nbytes(shape, dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= int(s)
    return n


class SafetensorsReader:
    """One safetensors file: header parsed and checked against the file size on open; tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConversionError(f"{self.path}: file is missing (it is listed by the checkpoint); "
                                  f"copy the complete checkpoint again")
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._parse()
        except Exception:
            self.close()  # and mark closed: __del__ must not close a descriptor number reused since
            raise

    def _parse(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise ConversionError(f"{self.path}: {size} bytes, too short for a safetensors file "
                                  f"(truncated copy?); copy it again")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise ConversionError(f"{self.path}: header length {hlen} does not fit in the file ({size} bytes): "
                                  f"truncated or not a safetensors file; copy it again")
        try:
            header = json.loads(os.pread(self._fd, hlen, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConversionError(f"{self.path}: unreadable safetensors header ({err}); copy the file again") from err
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + hlen
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, info in header.items():
            dtype = ST_TO_DTYPE.get(info.get("dtype"))
            if dtype is None:
                raise ConversionError(f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            if end - start != nbytes(shape, dtype):
                raise ConversionError(f"{self.path}: tensor {name!r} header is inconsistent "
                                      f"(shape {shape} {dtype} but {end - start} bytes); the file is corrupt")
            self.entries[name] = (dtype, shape, start, end)
            end_max = max(end_max, end)
        if self.data_start + end_max > size:
            raise ConversionError(
                f"{self.path}: truncated: the header describes {self.data_start + end_max} bytes, the file has "
                f"{size}; copy the file again")

    def keys(self):
        return self.entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read into a buffer of its own."""
        if name not in self.entries:
            raise ConversionError(f"{self.path}: no tensor {name!r}")
        dtype, shape, start, end = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end > start:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            pos, want = 0, end - start
            while pos < want:  # pread may return fewer bytes than asked for large reads
                got = os.preadv(self._fd, [view[pos:]], self.data_start + start + pos)
                if got <= 0:
                    raise ConversionError(f"{self.path}: unexpected end of file reading {name!r}; copy it again")
                pos += got
        return out

    def view(self, name: str) -> torch.Tensor:
        """The tensor without copying it: a view of a private memory map of just its bytes.

        Why: a conversion mostly moves bytes from one file to another. Reading them into fresh
        buffers first costs a page fault per 4 KB of new memory, which on a VM was the largest part
        of a conversion (``benchmarks/convert_1p5b.py``); a view is backed by the page cache the
        kernel already holds, as ``safetensors.torch.load_file``'s tensors are, and
        ``SafetensorsWriter`` copies it file to file without touching it at all (``file_region``).
        The map is private (copy-on-write), so writing to the tensor never changes the file, and it
        is unmapped when the last tensor using it is freed, so memory stays bounded by the tensors
        alive. The file must not be truncated while views of it are alive (reading past the end
        kills the process with SIGBUS; ``get`` copies are immune; a file-to-file copy reports it).
        """
        if name not in self.entries:
            raise ConversionError(f"{self.path}: no tensor {name!r}")
        dtype, shape, start, end = self.entries[name]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        first = self.data_start + start
        base = first - first % mmap.ALLOCATIONGRANULARITY  # maps start on a page boundary
        try:
            mapped = mmap.mmap(self._fd, self.data_start + end - base, offset=base, access=mmap.ACCESS_COPY)
        except OSError:  # a file system without memory maps: read a copy instead
            return self.get(name)
        if hasattr(mmap, "MADV_WILLNEED"):
            mapped.madvise(mmap.MADV_WILLNEED)  # start reading a file that is not cached yet
        count = (end - start) // dtype.itemsize
        tensor = torch.frombuffer(mapped, dtype=dtype, offset=first - base, count=count)
        _register_view(tensor, self._fd, first, mapped)  # lets a writer copy it file to file
        return tensor.view(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _concat_shape(blocks: list[torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of the dim-0 concatenation of ``blocks``, or None if they do not concatenate."""
    if len(blocks) == 1:
        return blocks[0].dtype, tuple(blocks[0].shape)
    if not blocks or any(b.dim() == 0 for b in blocks):
        return None
    dtype, rest = blocks[0].dtype, tuple(blocks[0].shape[1:])
    if any(b.dtype != dtype or tuple(b.shape[1:]) != rest for b in blocks):
        return None
    return dtype, (sum(b.shape[0] for b in blocks), *rest)


class SafetensorsWriter:
    """Write a safetensors file whose entries (name, dtype, shape) are known up front, tensor by tensor.

    Tensors must arrive in the planned order; ``close`` checks that all did and, with ``fsync``
    (the default), waits until the file is on the disk. ``fsync=False`` leaves the writing to the
    kernel's own schedule: faster (a conversion is then bounded by memory, not by the disk), at the
    cost that a power loss or OS crash soon after may leave the file truncated. A tensor may be
    given as a list of row blocks (tensors whose concatenation along dim 0 is the planned tensor,
    such as the q/k/v blocks of a fused QKV), which are written one after another without being
    concatenated in memory.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in entries:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._expected = list(entries)
        self._next = 0
        self._fh = open(self.path, "wb", buffering=0)  # unbuffered: file-to-file copies write at its position too
        self._pos = 0  # bytes written so far
        self._synced = 0  # bytes [0, _synced) are queued for writeback
        self._write_bytes(memoryview(struct.pack("<Q", len(raw)) + raw))

    def write(self, name: str, tensor: torch.Tensor | list[torch.Tensor]) -> None:
        if self._next >= len(self._expected):
            raise RuntimeError(f"{self.path}: unplanned tensor {name!r}")
        exp_name, exp_dtype, exp_shape = self._expected[self._next]
        blocks = [tensor] if isinstance(tensor, torch.Tensor) else list(tensor)
        got = _concat_shape(blocks)
        if (name, got) != (exp_name, (exp_dtype, tuple(exp_shape))):
            got_text = f"{got[0]} {got[1]}" if got else f"row blocks {[(b.dtype, tuple(b.shape)) for b in blocks]}"
            raise RuntimeError(f"{self.path}: got {name!r} {got_text}, planned {exp_name!r} {exp_dtype} "
                               f"{tuple(exp_shape)}")
        for block in blocks:
            t = block.detach().to("cpu").contiguous()
            if not t.numel():
                continue
            data = memoryview(t.view(-1).view(torch.uint8).numpy())
            region = file_region(t)
            done = self._copy_file(*region, len(data), name) if region else 0
            for start in range(done, len(data), _WRITE_CHUNK):
                self._write_bytes(data[start:start + _WRITE_CHUNK])
        self._next += 1

    def _copy_file(self, fd: int, offset: int, size: int, name: str) -> int:
        """Copy ``size`` bytes at ``offset`` of the input file ``fd`` here, inside the kernel.

        Why: a view's bytes are already in the input's page cache; ``sendfile`` moves them page
        cache to page cache without the page faults of reading the memory map, and leaves the
        output in large page-cache pages (``benchmarks/convert_1p5b.py``: the ``--no-fsync`` round
        trip went from 1.91-2.37x to 1.26-1.76x a plain load + save against ``write`` from the map).
        Returns the bytes copied: less than ``size`` only where the file systems refuse
        ``sendfile``, and the caller writes the rest from memory.
        """
        done = 0
        while done < size:
            try:
                sent = os.sendfile(self._fh.fileno(), fd, offset + done, min(_WRITE_CHUNK, size - done))
            except OSError as err:
                if err.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
                    return done
                raise
            if sent == 0:
                raise ConversionError(f"{self.path}: the input file holding {name!r} ended early (truncated while "
                                      f"converting?); copy the input again and rerun")
            done += sent
            self._pos += sent
            self._start_writeback()
        return done

    def _write_bytes(self, data: memoryview) -> None:
        while len(data):
            written = self._fh.write(data)  # an unbuffered write may write less than asked
            data = data[written:]
            self._pos += written
        self._start_writeback()

    def _start_writeback(self) -> None:
        """Queue what was written so far for the disk now, so that ``close``'s fsync has little left
        to wait for (the kernel would otherwise start only once GBs of dirty pages pile up)."""
        if _sync_file_range is None or not self.fsync or self._pos - self._synced < _WRITE_CHUNK:
            return
        _sync_file_range(self._fh.fileno(), self._synced, self._pos - self._synced, _SYNC_FILE_RANGE_WRITE)
        self._synced = self._pos

    def close(self) -> None:
        if self._fh is None:
            return
        if self._next != len(self._expected):
            missing = [e[0] for e in self._expected[self._next:]][:3]
            self._fh.close()
            self._fh = None
            raise RuntimeError(f"{self.path}: closed before all tensors were written (next: {missing})")
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
