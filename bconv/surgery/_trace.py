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
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import LeafModuleAwareTracer, _set_default_tracer_kwargs

from ..errors import InputSizeError, TraceError

__all__ = [
    "Traced", "trace", "propagate_shapes", "eval_mode", "dummy_input", "model_error_message",
    "second_size", "on_meta", "geometry",
]  # fmt: skip


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
    # The same graph at a second input size, to tell spatial dimensions from channels (None: the model
    # accepts one size only), and how shapes were obtained: "meta" tensors (no real compute) or "real".
    alt_input_size: tuple[int, ...] | None = None
    alt_shapes: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    shapes_from: str = "meta"

    def index(self, node: fx.Node) -> int:
        return node.meta["bconv_index"]

    def geometry(self, node: fx.Node) -> tuple[str, int, int] | None:
        """``(layout, reduction, channels)`` of a node's output feature map; None for anything else."""
        shape = self.shapes.get(node)
        if shape is None:
            return None
        alt = self.alt_shapes.get(node) if self.alt_input_size is not None else None
        return geometry(shape[1:], self.input_size, alt[1:] if alt is not None else None, self.alt_input_size)


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
    if scope is None or (scope and not scope[-1][0]):
        # No submodule was running: the failing step is in the network's own forward, which cannot be a leaf.
        hint = (
            f" The data-dependent step is in {type(model).__name__}.forward itself, which cannot be a leaf: move it "
            f"into a submodule and pass leaf_modules=[ThatSubmodule], or give bconv the part that traces "
            f"(wrap_with_ptl(model.backbone) in place of the whole model, as for a detector)."
        )
    elif not hint:
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


def second_size(input_size: Sequence[int], real: bool = False) -> tuple[int, ...]:
    """The second input size shapes are propagated at.

    On meta tensors, twice the height and width: doubling keeps every divisibility the first size has
    (windows, patches, strides) and moves every spatial dimension by at least one pixel up to a
    reduction of ``H``, while channels stay put. A real forward (``real=True``) costs with the size,
    quadratically in a transformer's tokens, so it gets 64 more pixels a side instead: every map at a
    reduction up to 64 still moves.
    """
    c, h, w = input_size
    return (c, h + 64, w + 64) if real else (c, 2 * h, 2 * w)


_LARGEST_REDUCTION_EXPONENT = 12  # reductions up to 4096


def _fits(size: int, out: int, r: int) -> bool:
    """Whether ``out`` pixels are ``size`` input pixels at reduction ``r``: within the rounding of strided
    layers (less than a pixel off ``size / r``: 48 px at 32 is a 2-pixel map), or within a factor of 2^0.4
    (valid, unpadded convolutions shave a few pixels off a large map)."""
    exact = size / r
    return abs(out - exact) < 1 or abs(math.log2(exact / out)) <= 0.4


def _reduction(pairs: Sequence[tuple[int, int]]) -> int | None:
    """The power of two every ``(input pixels, map pixels)`` pair fits (see :func:`_fits`), the closest if several.

    With the pairs of one tensor at two input sizes (height and width at each), the reduction is what the
    network does at both, not one ratio rounded with a tolerance: at 48 px a 2x2 map is at 32 (48 / 2 = 24
    is no power of two), because at 96 px the same map is 3x3.
    """
    if any(out < 1 for _, out in pairs):
        return None
    best: tuple[float, int] | None = None
    for k in range(_LARGEST_REDUCTION_EXPONENT + 1):
        r = 2**k
        if all(_fits(size, out, r) for size, out in pairs):
            error = max(abs(math.log2(size / (r * out))) for size, out in pairs)
            if best is None or error < best[0]:
                best = (error, r)
    return best[1] if best else None


def geometry(
    shape: Sequence[int],
    input_size: Sequence[int],
    alt_shape: Sequence[int] | None = None,
    alt_input_size: Sequence[int] | None = None,
) -> tuple[str, int, int] | None:
    """``(layout, reduction, channels)`` when ``shape`` (no batch) is a feature map of an input of ``input_size``.

    Measured, not guessed: with the shape of the same tensor at a second input size, the spatial
    dimensions are the two that followed the input's height and width, the channels the one that did
    not (``[C, H, W]`` is NCHW, ``[H, W, C]`` NHWC, Swin-like). A map whose size did not follow the input
    (a globally pooled ``[C, 1, 1]``) is not a feature map. The reduction is the power of two that the
    map's height and width at both sizes agree on (see :func:`_reduction`).

    Without a second size (a model that accepts one input size only) the layout is read from the one
    shape, strictly: its height and width must keep the input's aspect ratio, and a shape that reads
    both ways (``[56, 56, 56]`` for a square input) is no feature map rather than a guess.
    """
    if len(shape) != 3:
        return None
    readings = {"NCHW": (shape[1], shape[2], shape[0]), "NHWC": (shape[0], shape[1], shape[2])}
    if alt_shape is not None and alt_input_size is not None:
        if len(alt_shape) != 3:
            return None
        changed = tuple(i for i in range(3) if shape[i] != alt_shape[i])
        layout = {(1, 2): "NCHW", (0, 1): "NHWC"}.get(changed)
        if layout is None:
            return None
        alt = {"NCHW": (alt_shape[1], alt_shape[2]), "NHWC": (alt_shape[0], alt_shape[1])}[layout]
        h, w, c = readings[layout]
        pairs = [(input_size[1], h), (input_size[2], w), (alt_input_size[1], alt[0]), (alt_input_size[2], alt[1])]
        r = _reduction(pairs)
        return None if r is None else (layout, r, c)
    fits = []
    for layout, (h, w, c) in readings.items():
        r = _reduction([(input_size[1], h), (input_size[2], w)])
        # The aspect ratio must survive (within a pixel or two of unpadded convs): 56x48 is no map of 224x224.
        if r is not None and abs(h * input_size[2] - w * input_size[1]) <= 2 * max(input_size[1:]):
            fits.append((layout, r, c))
    return fits[0] if len(fits) == 1 else None


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        value = value.values()
    return isinstance(value, (tuple, list, type({}.values()))) and any(_has_tensor(v) for v in value)


# Modules whose output has their input's shape and dtype, whatever their weights: on meta tensors their
# (Python-level, decomposed) kernels are most of a shape pass and tell nothing, so they are skipped.
def _squeeze_excitation_modules() -> tuple[type, ...]:
    """Squeeze-and-excitation blocks of torchvision and timm: ``x * gate(pool(x))``, the input's shape."""
    from torchvision.ops.misc import SqueezeExcitation

    found: list[type] = [SqueezeExcitation]
    try:
        from timm.layers.squeeze_excite import EffectiveSEModule, SEModule, SqueezeExciteCl
        from timm.models._efficientnet_blocks import SqueezeExcite
    except ImportError:  # timm is a dependency, but stay usable without it (or with another layout of it)
        return tuple(found)
    return (*found, SEModule, EffectiveSEModule, SqueezeExciteCl, SqueezeExcite)


_SAME_SHAPE_MODULES = (
    nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish,
    nn.Hardsigmoid, nn.Tanh, nn.LeakyReLU, nn.Mish, nn.ELU, nn.PReLU, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.AlphaDropout, *_squeeze_excitation_modules(),
)  # fmt: skip
_SAME_SHAPE_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu, torch.nn.functional.relu6,
    torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.hardswish,
    torch.nn.functional.hardsigmoid, torch.nn.functional.sigmoid, torch.nn.functional.dropout,
    torch.nn.functional.batch_norm,
}  # fmt: skip


def _run_sequential(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain ``nn.Sequential`` on a meta tensor, skipping the children that keep shapes."""
    for child in module:
        if isinstance(child, _SAME_SHAPE_MODULES):
            continue
        x = _run_sequential(child, x) if type(child).forward is nn.Sequential.forward else child(x)
    return x


def _identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


@contextlib.contextmanager
def shape_keeping_skipped(module: nn.Module) -> Iterator[None]:
    """Inside, every shape-keeping submodule of ``module`` (BatchNorm, activations, dropout) returns its input.

    For a forward on meta tensors that only needs shapes: BatchNorm's decomposition on meta costs more than
    the convolutions. The modules' hooks still run; their own ``forward`` is back on exit.
    """
    patched = [m for m in module.modules() if isinstance(m, _SAME_SHAPE_MODULES) and "forward" not in m.__dict__]
    for m in patched:
        m.forward = _identity
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


_BROADCAST_FUNCTIONS = {operator.add, operator.mul, operator.sub, torch.add, torch.mul}


class _ShapeRecorder(fx.Interpreter):
    """Runs a traced graph and records every tensor node's shape; on meta tensors, skips what keeps shapes."""

    def __init__(self, traced: Traced, shapes: dict[fx.Node, tuple[int, ...]]):
        super().__init__(traced.graph_module)
        self.traced = traced
        self.shapes = shapes

    def _same_shape(self, n: fx.Node) -> torch.Tensor | None:
        if not n.args or not isinstance(n.args[0], fx.Node):
            return None
        x = self.env.get(n.args[0])
        if not isinstance(x, torch.Tensor) or not x.is_meta:
            return None
        if n.op == "call_module":
            module = self.fetch_attr(str(n.target))
            if isinstance(module, _SAME_SHAPE_MODULES):
                return x
            if type(module).forward is nn.Sequential.forward and len(n.args) == 1 and not n.kwargs:
                return _run_sequential(module, x)  # a leaf block (torchvision's Conv2dNormActivation)
            return None
        if n.op == "call_function" and n.target in _SAME_SHAPE_FUNCTIONS:
            return x
        if n.op == "call_function" and n.target in _BROADCAST_FUNCTIONS and len(n.args) == 2 and not n.kwargs:
            y = self.env.get(n.args[1]) if isinstance(n.args[1], fx.Node) else n.args[1]
            if isinstance(y, torch.Tensor) and y.is_meta:
                shape = torch.broadcast_shapes(x.shape, y.shape)
                return torch.empty(shape, dtype=torch.result_type(x, y), device="meta")
            if isinstance(y, (int, float)):
                return x
        return None

    def run_node(self, n: fx.Node) -> Any:
        out = self._same_shape(n)
        if out is None:
            out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
            self.traced.carries_tensor.add(n)
        elif isinstance(out, (tuple, list, dict)) and _has_tensor(out):
            self.traced.carries_tensor.add(n)
        return out


class _Call(nn.Module):
    """Runs ``fn`` with ``module`` as a child, so that ``torch.func.functional_call`` can swap its tensors."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.module = module
        self.__dict__["fn"] = fn  # not a child: a module passed as fn must appear once, under `module`

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def on_meta(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)`` while every parameter and buffer of ``module`` is a meta tensor of its shape and dtype.

    Meta tensors carry shapes and no data, so no real convolution runs: the cost does not grow with the
    model's FLOPs or the input resolution. The module's own tensors are swapped back afterwards
    (``torch.func.functional_call``), untouched.
    """
    tensors = {
        f"module.{name}": torch.empty_like(t, device="meta")
        for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    }
    with torch.no_grad():
        return torch.func.functional_call(_Call(module, fn), tensors, args, strict=False)


def meta_input(model: nn.Module, input_size: Sequence[int], batch: int = 1) -> torch.Tensor:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    return torch.empty(batch, *input_size, device="meta", dtype=dtype)


def run_at_two_sizes(
    model: nn.Module, input_size: Sequence[int], run: Callable[[torch.Tensor], Any], holder: nn.Module | None = None
) -> tuple[str, Any, Any]:
    """``run(x)`` at ``input_size`` and at :func:`second_size`, on meta tensors where the model allows.

    ``holder`` is the module whose tensors ``run`` reads (a traced GraphModule of ``model``); default ``model``.

    Returns ``(shapes_from, first, second, second_size)``: ``"meta"`` or ``"real"`` (a model that meta tensors cannot
    run: data-dependent shapes, tensors it keeps outside its parameters and buffers), the two results,
    and ``None`` for the second when the model accepts its first input size only.

    Raises:
        InputSizeError: the model itself rejects ``input_size``, with the model's own message.
    """
    input_size = tuple(input_size)
    alt = second_size(input_size)
    holder = model if holder is None else holder
    try:
        first = on_meta(holder, run, meta_input(model, input_size))
    except Exception:
        pass
    else:
        try:
            second = on_meta(holder, run, meta_input(model, alt))
        except Exception:
            second = None
        return "meta", first, second, alt
    x = dummy_input(model, input_size)
    try:
        with torch.no_grad():
            first = run(x)
    except Exception as run_error:
        try:
            with torch.no_grad():
                model(x)
        except Exception as e:
            raise InputSizeError(model_error_message(model, x, e)) from e
        raise run_error
    alt = second_size(input_size, real=True)
    try:
        with torch.no_grad():
            second = run(dummy_input(model, alt))
    except Exception:
        second = None
    return "real", first, second, alt


def propagate_shapes(traced: Traced, model: nn.Module, input_size: Sequence[int]) -> None:
    """Record each tensor node's shape at ``input_size`` and at a second size (:func:`second_size`).

    Shapes come from meta tensors, so no real compute runs; a model that meta tensors cannot run gets a
    real forward instead, and ``traced.shapes_from`` says which.

    Raises:
        InputSizeError: when the model itself rejects ``input_size``, with the model's own message.
        TraceError: when the model runs but its traced graph does not.
    """
    traced.input_size = tuple(input_size)

    def run(x: torch.Tensor) -> dict[fx.Node, tuple[int, ...]]:
        found: dict[fx.Node, tuple[int, ...]] = {}
        _ShapeRecorder(traced, found).run(x)
        return found

    try:
        traced.shapes_from, first, second, alt = run_at_two_sizes(model, input_size, run, traced.graph_module)
    except InputSizeError:
        raise
    except Exception as graph_error:
        raise TraceError(
            f"The fx graph of {type(model).__name__} fails on an input the model itself accepts "
            f"({type(graph_error).__name__}: {_first_line(graph_error)}). Mark the module that "
            f"branches on tensor values as a leaf with find_stages(model, leaf_modules=[...]), "
            f"or use source='feature_info' for a timm model."
        ) from graph_error
    traced.shapes = first
    traced.alt_shapes = second or {}
    traced.alt_input_size = alt if second is not None else None
