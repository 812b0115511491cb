"""Tracing with torch.fx that remembers which module produced which node.

The stage finder needs three facts that a plain ``fx.symbolic_trace`` loses:
which module call each graph node was created in (to group modules into
stages), which module calls *return* a given node (to name a stage by the
outermost module whose output it is, so that a forward hook on that module sees
the stage output), and the shape of every node at a given input size.

Leaves are torchvision's defaults (``torchvision.ops`` modules, ``math``
autowrapped) plus timm's registries of non-traceable modules and functions,
plus whatever the caller adds. Nothing here copies those lists.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import LeafModuleAwareTracer, _set_default_tracer_kwargs

from ..errors import InputSizeError, TraceError

__all__ = ["Traced", "trace", "propagate_shapes", "eval_mode", "dummy_input", "model_error_message"]


def _timm_notrace() -> tuple[list[type], list[Callable]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but stay usable without it
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


class _ScopeTracer(LeafModuleAwareTracer):
    """Records, for every module call, the range of nodes created inside it and the node it returned."""

    def __init__(self, leaf_modules: Sequence[type], autowrap_functions: Sequence[Callable]):
        kwargs = _set_default_tracer_kwargs({"leaf_modules": list(leaf_modules)})
        super().__init__(
            autowrap_modules=kwargs["autowrap_modules"],
            autowrap_functions=tuple(autowrap_functions),
            leaf_modules=kwargs["leaf_modules"],
        )
        self.bconv_count = 0
        self.bconv_calls: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.bconv_returned_by: dict[fx.Node, list[str]] = defaultdict(list)
        self.bconv_stack: list[tuple[str, type]] = []
        self.bconv_failed_stack: list[tuple[str, type]] | None = None

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["bconv_index"] = self.bconv_count
        self.bconv_count += 1
        return node

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        start = self.bconv_count
        self.bconv_stack.append((path, type(m)))
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.bconv_failed_stack is None:
                self.bconv_failed_stack = list(self.bconv_stack)
            raise
        finally:
            self.bconv_stack.pop()
        self.bconv_calls[path].append((start, self.bconv_count - 1))
        if isinstance(out, fx.Proxy):
            self.bconv_returned_by[out.node].append(path)
        return out


@dataclass
class Traced:
    """A traced model: its graph in execution order plus the facts recorded while tracing."""

    graph_module: fx.GraphModule
    nodes: list[fx.Node]
    calls: dict[str, list[tuple[int, int]]]
    returned_by: dict[fx.Node, list[str]]
    modules: dict[str, nn.Module]
    input_size: tuple[int, ...] = ()
    shapes: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    carries_tensor: set[fx.Node] = field(default_factory=set)

    def index(self, node: fx.Node) -> int:
        return node.meta["bconv_index"]


def trace(model: nn.Module, leaf_modules: Iterable[type] = ()) -> Traced:
    """Trace ``model`` with torch.fx, treating timm's, torchvision's and the caller's leaves as leaves.

    Raises:
        TraceError: naming the module being traced when fx gave up, the operation, and how to mark it a leaf.
    """
    timm_modules, timm_functions = _timm_notrace()
    tracer = _ScopeTracer([*timm_modules, *leaf_modules], timm_functions)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, AssertionError, ...
        raise TraceError(_trace_failure_message(model, tracer.bconv_failed_stack, e)) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return Traced(gm, list(gm.graph.nodes), dict(tracer.bconv_calls), dict(tracer.bconv_returned_by), dict(model.named_modules()))


def _trace_failure_message(model: nn.Module, scope: list[tuple[str, type]] | None, e: Exception) -> str:
    reason = _first_line(e)
    where = f"model {type(model).__name__}"
    hint = ""
    if scope:
        # The innermost non-root module is the smallest thing to make a leaf.
        path, cls = scope[-1]
        where = f"module `{path or '<root>'}` ({cls.__module__}.{cls.__qualname__})"
        if path:
            hint = (
                f" Mark that module as a leaf so fx calls it as a whole: "
                f"find_stages(model, leaf_modules=[{cls.__qualname__}]) "
                f"(or timm.layers.register_notrace_module({cls.__qualname__}) for every timm trace)."
            )
    if not hint:
        hint = " Mark the module that does this as a leaf with find_stages(model, leaf_modules=[TheModuleClass])."
    return (
        f"torch.fx could not trace {type(model).__name__}: in {where}, {type(e).__name__}: {reason}.{hint} "
        f"For a timm model with feature_info, source='feature_info' needs no tracing."
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].rstrip(".")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards (frozen BN stays frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def dummy_input(model: nn.Module, input_size: Sequence[int], batch: int = 1) -> torch.Tensor:
    """A random input on the model's device and floating dtype."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return torch.randn(batch, *input_size, device=device, dtype=dtype)


def model_error_message(model: nn.Module, x: torch.Tensor, e: BaseException) -> str:
    return (
        f"{type(model).__name__} rejected a dummy input of shape {tuple(x.shape)} "
        f"(input_size={tuple(x.shape[1:])}): {type(e).__name__}: {_first_line(e)}. "
        f"Pass the input_size (C, H, W) the model expects."
    )


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, traced: Traced):
        super().__init__(traced.graph_module)
        self.traced = traced

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.traced.shapes[n] = tuple(out.shape)
            self.traced.carries_tensor.add(n)
        elif isinstance(out, (tuple, list, dict)) and _has_tensor(out):
            self.traced.carries_tensor.add(n)
        return out


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        value = value.values()
    return isinstance(value, (tuple, list, type({}.values()))) and any(_has_tensor(v) for v in value)


def propagate_shapes(traced: Traced, model: nn.Module, x: torch.Tensor) -> None:
    """Run the graph once on ``x`` (no grad) and record each tensor node's shape.

    Raises:
        InputSizeError: when the model itself rejects ``x``, with the model's own message.
        TraceError: when the model runs but its traced graph does not.
    """
    traced.input_size = tuple(x.shape[1:])
    try:
        with torch.no_grad():
            _ShapeRecorder(traced).run(x)
    except Exception as graph_error:
        try:
            with torch.no_grad():
                model(x)
        except Exception as e:
            raise InputSizeError(model_error_message(model, x, e)) from e
        raise TraceError(
            f"The fx graph of {type(model).__name__} fails on an input the model itself accepts "
            f"({type(graph_error).__name__}: {_first_line(graph_error)}). Mark the module that "
            f"branches on tensor values as a leaf with find_stages(model, leaf_modules=[...]), "
            f"or use source='feature_info' for a timm model."
        ) from graph_error
