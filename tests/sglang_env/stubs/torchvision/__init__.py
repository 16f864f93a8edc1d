"""TEST-ENVIRONMENT WORKAROUND (not product code): an empty stand-in for ``torchvision``.

Why: SGLang 0.5.23 imports torchvision at start-up from multimodal modules a text-only model
never runs (e.g. ``srt/multimodal/internvl_utils.py``: ``import torchvision.transforms as T``).
PyPI's torchvision 0.28.0 is a CUDA build: against the CPU torch its ops library does not load and
``import torchvision`` fails (``RuntimeError: operator torchvision::nms does not exist``). So the
SGLang test environment installs no torchvision, and this package (on the server's PYTHONPATH,
see tests/sglang_server.py) lets those imports succeed: every ``torchvision.*`` module exists,
every attribute is a placeholder, and CALLING anything raises, naming it. A text model never does.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+sglang-test-stub"


class _Placeholder:
    """Stands for any torchvision object; attribute access chains, calling fails loudly."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self._name}: torchvision is a stub in the SGLang test environment "
                                  "(tests/sglang_env/stubs/torchvision); text-only models never call it")

    def __mro_entries__(self, bases):  # `class X(torchvision.Something)` at import time
        return (object,)

    def __repr__(self):
        return f"<torchvision stub {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())


def __getattr__(attr):  # `torchvision.X` on the package itself
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Placeholder(f"torchvision.{attr}")
