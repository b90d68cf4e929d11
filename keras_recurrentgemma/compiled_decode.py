"""A compiled per-token decode step for the torch backend.

`generation_compile.compile_for_backend(step, model, torch_mode=...)` wraps
a step (`generation.decode_step`, for `generate` and for streaming) in the
`TorchDecodeStep` here; nothing else builds one.

Eager Keras on torch spends most of a decode step in Python: every layer's
`__call__` (name scopes, autocast, tracking) and every `keras.ops` call
(dtype and tensor conversion) for a one-token input, about 20 ms per step
for a 7M-parameter Griffin on a CPU core. `torch.compile` cannot take the
Keras code directly: Dynamo breaks the graph at Keras's context managers and
recompiles for every layer.

So the step is traced once per input signature with `make_fx` (real
tensors; Python runs once, and only the aten ops it issued are kept), what
depends only on constants is computed once (`fold_constants`), and then:

- `"graph"`: the traced graph, about 900 ops for six blocks, recorded again
  by `torch.jit.trace` and run by TorchScript's C++ interpreter (an fx
  graph runs as generated Python, a call per op). Same kernels and results
  as eager, bit for bit, without the Python overhead. Tracing takes about
  0.8 seconds per batch size for six blocks, 4.5 for the 2B's 26.
- `"auto"`: `"graph"` for a call that will decode at least
  `AUTO_MIN_STEPS` tokens, or once its signature has decoded that many
  eagerly over any number of calls; eager before. The default on a CPU: a
  lone short call pays for no trace, and a run of them pays at most about
  twice what tracing first would have cost.
- `"inductor"`: the graph is compiled with `torch.compile` (Inductor;
  `mode="reduce-overhead"`, i.e. CUDA graphs, on CUDA). Inductor's C++
  compile takes 20 to 50 seconds per batch size on a CPU (seconds once its
  on-disk cache holds the graph).

Measured (`tools/benchmark_generate.py --config cpu7m --threads 1
--torch-modes auto eager graph`, tokens a second, batch 1 / batch 8):
`"auto"` 328 / 1526, `"graph"` 341 / 1491, eager 60 / 394, HF transformers
306 / 1512 in the same run; the 2B on two cores
(`tools/benchmark_real_size.py`, `"auto"` after its warm-up calls): 0.309
s a token against HF's 0.297 in the same run, and eager's 0.37-0.39.

The default (`compile(jit_compile="auto")`) is `"inductor"` on CUDA and
`"auto"` on a CPU. A step whose tracing or compilation fails runs eagerly
from then on, after a one-time warning. The traced graph reads the model's
variables in place (an `assign` is seen); a change in which variables exist
(LoRA, quantization) changes the signature, and so traces again.
"""

import operator
import warnings

MODES = ("auto", "eager", "graph", "inductor")

# `"auto"` traces a step for a call that will take at least this many
# steps, or once a signature has run this many eagerly. A trace costs what
# about 60 steps then save, at the 2B (4.5 s against 0.37 -> 0.29 s a
# token, two cores) and at `cpu7m` (0.76 s against 16 -> 2.7 ms, one core)
# alike: from 64 on, a call gains more than it paid.
AUTO_MIN_STEPS = 64

_warned = set()


def resolve_mode(jit_compile, run_eagerly, device_type):
    """The decode mode for `compile(jit_compile=...)` on a torch device.

    `False` or `run_eagerly` → `"eager"`; `True` → `"inductor"`; `"auto"` →
    `"inductor"` on CUDA and `"auto"` elsewhere.
    """
    if run_eagerly or jit_compile is False:
        return "eager"
    if jit_compile is True or device_type == "cuda":
        return "inductor"
    return "auto"


def _warn_once(reason, error):
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(
        f"The compiled torch decode step failed ({reason}: "
        f"{type(error).__name__}: {error}); decoding eagerly instead. Pass "
        "`compile(jit_compile=False)` to decode eagerly without trying.",
        stacklevel=3,
    )


def _dense(x):
    """`x` with row-major strides, size-1 dimensions included (a view such
    as `y[:, -1]` of `[1, t, l]` is "contiguous" with stride `t·l`, and
    `torch.compile` guards on strides)."""
    import torch

    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= size
    if x.stride() == tuple(reversed(expected)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


class TorchDecodeStep:
    """Runs a pure step function through a traced (and maybe compiled) graph.

    The arguments are flattened (`torch.utils._pytree`), so the graph takes
    and returns flat lists of tensors; one graph is traced per input
    signature (shapes, dtypes, devices, and `variables_key`).

    Args:
        step: callable on tensors and `NamedTuple`s of tensors, with no side
            effects.
        mode: one of `MODES`.

    Call arguments:
        *args: the step's arguments.
        variables_key: hashable; graphs traced under another key are not
            reused (pass something that changes when the model's set of
            variables does).
        planned_steps: int or `None`, how many steps the caller will take
            at most. In `"auto"` a signature not yet traced is traced for
            at least `AUTO_MIN_STEPS`, or once it has run that many steps
            eagerly (`_worth_tracing`), and runs eagerly otherwise.
    """

    def __init__(self, step, mode):
        if mode not in MODES:
            raise ValueError(f"Unknown decode mode {mode!r}; expected one of {MODES}.")
        self.step = step
        self.mode = mode
        self._graphs = {}
        # `"auto"`: eager steps run so far per signature not yet traced.
        self._eager_steps = {}
        # How many graphs were traced; tests and benchmarks read it.
        self.num_traces = 0

    def __call__(self, *args, variables_key=None, planned_steps=None):
        import torch
        from torch.utils import _pytree

        if self.mode == "eager":
            return self.step(*args)
        flat, spec = _pytree.tree_flatten(args)
        if not all(isinstance(x, torch.Tensor) for x in flat):
            return self.step(*args)  # E.g. a Python int `index`.
        # One layout per signature: a graph traced (or compiled, which
        # guards on strides) for dense inputs would otherwise meet the
        # prefill's strided views at the first step.
        flat = [_dense(x) for x in flat]
        key = (variables_key, tuple((x.shape, x.dtype, x.device) for x in flat))
        if key not in self._graphs:
            if self.mode == "auto" and not self._worth_tracing(key, planned_steps):
                return self.step(*args)
            self._graphs[key] = self._trace(flat, spec)
        graph = self._graphs[key]
        if graph is None or graph.in_spec != spec:
            return self.step(*args)
        try:
            with torch.no_grad():
                if graph.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                    # A CUDA graph's outputs are overwritten by its next
                    # replay; the caller keeps the cache across steps.
                    out = [x.clone() for x in graph.fn(*flat)]
                else:
                    out = graph.fn(*flat)
        except Exception as e:
            # Inductor compiles lazily, at the first call. The step is pure,
            # so running it eagerly on the same inputs is still correct.
            _warn_once("compilation", e)
            self._graphs[key] = None
            return self.step(*args)
        return _pytree.tree_unflatten(out, graph.out_spec)

    def _worth_tracing(self, key, planned_steps):
        """`"auto"`: trace for a call that alone will take `AUTO_MIN_STEPS`
        steps, or once this signature has run that many eagerly over any
        number of calls. A trace costs about what `AUTO_MIN_STEPS` eager
        steps lose, so a run of short calls (a chat, an evaluation loop)
        pays at most about twice what tracing first would have cost, and
        a lone short call pays nothing."""
        spent = self._eager_steps.get(key, 0)
        if max(spent, planned_steps or 0) >= AUTO_MIN_STEPS:
            return True
        self._eager_steps[key] = spent + 1
        return False

    def _trace(self, flat, spec):
        import torch
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.utils import _pytree

        graph = _Graph(spec)

        def flat_step(*flat):
            out = self.step(*_pytree.tree_unflatten(list(flat), spec))
            out, graph.out_spec = _pytree.tree_flatten(out)
            return out

        try:
            with torch.no_grad(), _one_fake_mode():
                # Raises on data-dependent Python (`.item()`), which would
                # otherwise be baked into the graph.
                traced = make_fx(flat_step)(*flat)
        except Exception as e:
            _warn_once("tracing", e)
            return None
        self.num_traces += 1
        fold_constants(traced)
        graph.traced = traced
        if self.mode in ("graph", "auto"):
            graph.fn = _interpreted(traced, flat)
            return graph
        graph.cuda_graphs = any(x.device.type == "cuda" for x in flat)
        graph.fn = torch.compile(
            traced,
            dynamic=False,
            fullgraph=True,
            mode="reduce-overhead" if graph.cuda_graphs else None,
        )
        return graph


def _interpreted(traced, flat):
    """`traced` recorded again by `torch.jit.trace`, to run in TorchScript's
    C++ interpreter instead of as the generated Python of an fx graph: the
    same aten ops on the same tensors (the model's variables are held by
    reference, so an `assign` is still seen), without a Python call each.
    The graph as traced if TorchScript cannot record it."""
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.jit.trace(traced, flat, check_trace=False)
    except Exception as e:
        _warn_once("TorchScript", e)
        return traced


def _one_fake_mode():
    """A tracing context holding one `FakeTensorMode` for a whole `make_fx`.

    `make_fx` records each traced op's output as a fake tensor, and, in its
    `"real"` mode, finds no fake mode to make it in and creates one per op;
    each new mode records the Python stack, which is deep under Keras
    (cProfile: 7.2 s of a 16.2 s profiled trace of 26 blocks went to
    creating them). With one mode the 2B's whole trace takes 4.5 s, 6.9
    before.

    `make_fx` looks for the mode in `torch._guards`' tracing context, which
    has no public equivalent; this is the one place it is used.
    """
    from torch._guards import TracingContext
    from torch._guards import tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))


class _Graph:
    """A traced step: its function on flat tensors and its pytree specs."""

    def __init__(self, in_spec):
        self.in_spec = in_spec
        self.out_spec = None
        # The fx graph as traced and folded, and what runs it.
        self.traced = None
        self.fn = None
        self.cuda_graphs = False


def fold_constants(traced):
    """Precomputes, once, what a traced step computes from constants alone.

    Keras code builds small constants on every call (`ops.arange`, RoPE's
    frequencies, scalars as tensors); traced, they are ops that run at every
    step. A value counts as constant only when it comes from a tensor
    created during tracing (`lift_fresh_copy`, which make_fx puts on every
    such tensor and never on a model variable) or from an op with no tensor
    input, through deterministic, non-mutating ops: variables are read in
    place and may be assigned between steps, so nothing that depends on one
    is folded. A step with any in-place op is left as traced.
    """
    import torch
    from torch.fx.node import map_arg

    graph = traced.graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    aten_ops = [n.target for n in calls if isinstance(n.target, torch._ops.OpOverload)]
    if any(op._schema.is_mutable for op in aten_ops):
        return
    lift = torch.ops.aten.lift_fresh_copy.default
    values = {}
    for node in calls:
        if node.target is not operator.getitem and (
            not isinstance(node.target, torch._ops.OpOverload)
            or torch.Tag.nondeterministic_seeded in node.target.tags
        ):
            continue
        inputs = node.all_input_nodes
        if node.target is lift:
            source = inputs[0]
            values[node] = getattr(traced, source.target).clone()
        elif all(n in values for n in inputs):
            args, kwargs = map_arg((node.args, node.kwargs), values.__getitem__)
            values[node] = node.target(*args, **kwargs)
    for i, (node, value) in enumerate(values.items()):
        if not isinstance(value, torch.Tensor):
            continue
        if all(user in values for user in node.users):
            continue  # Only other constants read it.
        name = f"_folded_constant{i}"
        traced.register_buffer(name, value)
        with graph.inserting_before(node):
            constant = graph.get_attr(name)
        node.replace_all_uses_with(constant)
    graph.eliminate_dead_code()
    traced.recompile()
