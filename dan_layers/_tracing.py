"""How dan-layers meets the graph tools of PyTorch: torch.fx, TorchScript.

``torch.fx.symbolic_trace`` runs ``forward`` with ``Proxy`` objects that have no
shape, dtype or device. Three things make the modules traceable:

* ``fx_leaf``: a function that reads shapes, devices or values (the losses, the
  per-head convolution, the layout of a channel unit's input) is recorded as one
  ``call_function`` node and runs as itself, on real tensors, when the graph runs:
  the traced graph computes what the module computes, validation of the losses
  included.
* ``call_as``: the features a user wants to pick out of a graph (a unit's
  attention maps, its attended features) are nodes named after the module's path,
  ``<path>_<name>``, e.g. ``head_attention_spatial_attended``: the same names in
  train and eval mode, whatever else the model holds.
* Input checks of the modules read shapes, which a ``Proxy`` does not have: they
  run in eager mode (and under ``torch.compile``), not while FX traces. A flag such
  as ``return_attention`` must be a Python bool when the graph is built
  (``concrete_args``); ``static_flag`` says so instead of FX's ``TraceError``.

``torch.jit.script`` is refused by ``NotScriptable``: TorchScript is in maintenance
mode, and ``torch.export`` (or ``torch.jit.trace``) captures these modules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import torch.fx

__all__: list[str] = []  # private module

P = ParamSpec("P")
R = TypeVar("R")


def is_proxy(value: object) -> bool:
    """Whether ``value`` is a ``torch.fx.Proxy`` (symbolic tracing is under way)."""
    return isinstance(value, torch.fx.Proxy)


def _first_proxy(values: tuple[Any, ...]) -> torch.fx.Proxy | None:
    for value in values:
        if isinstance(value, torch.fx.Proxy):
            return value
    return None


def fx_leaf(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: while torch.fx traces, one ``call_function`` node for ``fn`` instead of its body.

    Works however the function is imported (``torch.fx.wrap`` patches one module's
    globals only). Outside FX tracing it is ``fn`` behind one ``isinstance`` per argument.
    """

    @functools.wraps(fn)
    def leaf(*args: P.args, **kwargs: P.kwargs) -> R:
        proxy = _first_proxy((*args, *kwargs.values()))
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", leaf, args, kwargs)  # type: ignore[return-value]

    return leaf


def call_as(module: torch.nn.Module, name: str, fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)``; while torch.fx traces, one node named ``<path of module>_<name>``.

    ``fn`` is recorded as the node's target (``operator.mul``, ``torch.sum``, an
    ``fx_leaf`` function), so the graph computes exactly ``fn(*args)``. The path is
    the module's qualified name in the traced root with dots as underscores, as FX
    names ``call_module`` nodes; the root itself gives just ``name``.
    """
    proxy = _first_proxy(args)
    if proxy is None:
        return fn(*args)
    tracer = proxy.tracer
    path = ""
    if isinstance(tracer, torch.fx.Tracer):
        try:
            path = tracer.path_of_module(module)
        except NameError:  # a module called without being registered in the traced root
            path = ""
    node_name = f"{path.replace('.', '_')}_{name}" if path else name
    return tracer.create_proxy("call_function", fn, args, {}, name=node_name)  # type: ignore[return-value]


def static_flag(name: str, value: object) -> bool:
    """``bool(value)`` for a Python flag of ``forward``; a clear error if FX made it a ``Proxy``."""
    if isinstance(value, torch.fx.Proxy):
        raise ValueError(
            f"{name}: expected a Python bool, got a torch.fx Proxy; to trace this module itself, "
            f"pass concrete_args={{{name!r}: False}} (or True) to torch.fx.symbolic_trace"
        )
    return bool(value)


class NotScriptable:
    """Mixin of every dan-layers module: ``torch.jit.script`` raises a clear error.

    ``torch.jit.script`` calls ``__prepare_scriptable__`` on a module and on each of
    its submodules before compiling, so a model that contains one of ours is refused
    with this message instead of a TorchScript frontend error deep inside.
    """

    def __prepare_scriptable__(self) -> NoReturn:
        raise RuntimeError(
            f"{type(self).__name__}: torch.jit.script is not supported (TorchScript is in maintenance "
            "mode and cannot compile these modules); use torch.export.export for a graph without "
            "Python, torch.compile for speed, or torch.jit.trace / torch.fx.symbolic_trace"
        )
