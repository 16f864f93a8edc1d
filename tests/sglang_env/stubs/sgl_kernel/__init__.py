"""TEST-ENVIRONMENT WORKAROUND (not product code): a pure-torch stand-in for SGLang's CPU ``sgl_kernel``.

Why: SGLang 0.5.23 in CPU mode imports the CPU build of ``sgl_kernel`` at start-up, and there is no
CPU ``sgl_kernel`` on PyPI (SGLang's own CPU route compiles it from a git checkout for AVX-512/AMX,
which the development CPU lacks). See ../../../../shared/ENGINES_ON_CPU.md.

Only what a dense model on the ``torch_native`` attention backend calls is implemented:
``assign_req_to_token_pool_cpu``. The other names SGLang imports in CPU mode only need to exist;
calling one is an error that names it (so a new code path shows up loudly, not as wrong output).
No ``torch.ops.sgl_kernel`` ops are registered: that keeps SGLang's AMX fast paths off.
Put the parent directory on the server's PYTHONPATH (tests/sglang_server.py does).
"""
import torch


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For request i: ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` = its slice of
    ``out_cache_loc`` (the slices lie back to back in request order), as SGLang's triton kernel
    ``assign_req_to_token_pool`` does. ``pool_len`` (the row length) is implied by ``req_to_token``."""
    at = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), strict=True):
        req_to_token[row, start:end] = out_cache_loc[at:at + end - start].to(req_to_token.dtype)
        at += end - start


def _missing(name):
    def kernel(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: not implemented by the test stand-in "
                                  "(tests/sglang_env/stubs/sgl_kernel); only dense torch_native decoding is")
    kernel.__name__ = name
    return kernel


def __getattr__(name):
    # `from sgl_kernel import X_cpu` (CPU-mode imports) gets a loud placeholder; any other name is
    # absent, so SGLang's "is this kernel available" probes keep answering no
    if name.endswith("_cpu"):
        return _missing(name)
    raise AttributeError(f"module 'sgl_kernel' (test stand-in) has no attribute {name!r}")
