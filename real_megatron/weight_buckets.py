"""Weight buckets: how the trainer's weights travel to a rollout engine, a bounded number of bytes at a time.

``DEFAULT_BUCKET_BYTES`` is the one default bucket size (``rollout.weight_bucket_mb`` defaults to it);
``iter_buckets`` is the one bucketer. No torch import (tensors are only asked for their sizes), so
the config can use the constant without loading torch.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_BUCKET_BYTES = 512 << 20  # 512 MiB: large enough to amortise a request, small next to a GPU's memory


def iter_buckets(pairs: Iterator[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs, in order, into lists of at most ``bucket_bytes`` (a larger tensor is alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
