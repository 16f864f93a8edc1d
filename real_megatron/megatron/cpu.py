"""Run megatron-core 0.16.1 on the CPU with the gloo backend.

megatron-core assumes CUDA in a handful of places that the CPU path reaches:

* ``torch.cuda.current_device()`` as a ``device=`` argument (rotary embeddings, TP all-gathers,
  pipeline p2p buffers, the GPT model's token counter);
* ``device="cuda"`` literals (the schedules' ``total_num_tokens`` counter) and ``tensor.cuda()``;
* ``torch.cuda.get_rng_state / set_rng_state / manual_seed`` (the tensor-parallel RNG tracker);
* ``torch.cuda.synchronize()`` (pipeline p2p);
* ``grad.type() == "torch.cuda.FloatTensor"`` assertions (the optimizer's gradient clipping).

``enable_cpu_support()`` redirects exactly these to the CPU, once per process:
``current_device`` returns ``"cpu"``, the CUDA RNG calls act on the CPU generator (the tracker
saves and restores around its own use, so the default stream is left as it was), ``synchronize``
is a no-op, and a ``TorchFunctionMode`` rewrites ``device="cuda"`` arguments of tensor factories
and ``Tensor.cuda()`` to the CPU, and makes ``Tensor.type()`` report the CUDA type name. It is a
no-op when CUDA is available, so GPU runs are untouched.
Nothing else in the project patches torch or megatron.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite ``device="cuda"`` arguments and ``Tensor.cuda()`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # the optimizer's grad clipping asserts `grad.type() == "torch.cuda.FloatTensor"`
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_MODE: _CudaToCpuMode | None = None


def enable_cpu_support() -> bool:
    """Make megatron-core usable on the CPU; returns True if anything was patched."""
    global _ENABLED, _MODE
    if torch.cuda.is_available() or _ENABLED:
        return False
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    # not torch.manual_seed: it calls torch.cuda.manual_seed_all, which must stay a no-op
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.device_count = lambda: 0
    # the RNG tracker imported these names directly
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # process-wide: megatron's schedules create "cuda" tensors on every call
    _ENABLED = True
    return True

