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

- `"graph"`: the traced graph runs as it is: about 900 ops for six blocks
  (the layers' one-token steps took it from 1443). Same kernels and results
  as eager, bit for bit, without the Python overhead: on a CPU core, 3.3x
  eager's tokens/s at batch 1 (182 against 55; HF 283) and 2.7x at batch 8
  (994 against 374; HF 1452), `tools/benchmark_generate.py --config cpu7m
  --threads 1`; tracing takes about 1.3 seconds per batch size for six
  blocks, 5 for the 2B's 26, whose decode it takes from 0.37 to 0.31 s a
  token on two cores (HF 0.28-0.29).
- `"inductor"`: the graph is compiled with `torch.compile` (Inductor;
  `mode="reduce-overhead"`, i.e. CUDA graphs, on CUDA). Fastest per step
  (5x eager's tokens/s at batch 1, 4x at batch 8, on a CPU core, measured
  before the one-token steps), but
  Inductor's C++ compile takes 20 to 50 seconds per batch size on a CPU
  (seconds once its on-disk cache holds the graph).

The default (`compile(jit_compile="auto")`) is `"inductor"` on CUDA and
`"eager"` on a CPU, where tracing or compiling costs more than a typical
`generate` call saves (see `tools/benchmark_generate.py`). A step whose
tracing or compilation fails runs eagerly from then on, after a one-time
warning. The traced graph reads the model's variables in place (an `assign`
is seen); a change in which variables exist (LoRA, quantization) changes
the signature, and so traces again.
"""

import operator
import warnings

MODES = ("eager", "graph", "inductor")

_warned = set()


def resolve_mode(jit_compile, run_eagerly, device_type):
    """The decode mode for `compile(jit_compile=...)` on a torch device.

    `False` or `run_eagerly` → `"eager"`; `True` → `"inductor"`; `"auto"` →
    `"inductor"` on CUDA and `"eager"` elsewhere.
    """
    if run_eagerly or jit_compile is False:
        return "eager"
    if jit_compile is True or device_type == "cuda":
        return "inductor"
    return "eager"


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
    """

    def __init__(self, step, mode):
        if mode not in MODES:
            raise ValueError(f"Unknown decode mode {mode!r}; expected one of {MODES}.")
        self.step = step
        self.mode = mode
        self._graphs = {}
        # How many graphs were traced; tests and benchmarks read it.
        self.num_traces = 0

    def __call__(self, *args, variables_key=None):
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
            with torch.no_grad():
                # Raises on data-dependent Python (`.item()`), which would
                # otherwise be baked into the graph.
                traced = make_fx(flat_step)(*flat)
        except Exception as e:
            _warn_once("tracing", e)
            return None
        self.num_traces += 1
        fold_constants(traced)
        if self.mode == "graph":
            graph.fn = traced
            return graph
        graph.cuda_graphs = any(x.device.type == "cuda" for x in flat)
        graph.fn = torch.compile(
            traced,
            dynamic=False,
            fullgraph=True,
            mode="reduce-overhead" if graph.cuda_graphs else None,
        )
        return graph


class _Graph:
    """A traced step: its function on flat tensors and its pytree specs."""

    def __init__(self, in_spec):
        self.in_spec = in_spec
        self.out_spec = None
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
