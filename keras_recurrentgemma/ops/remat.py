"""`keras.remat` for a layer's call (`remat_call`: a residual block with
`remat=True`) or a function of tensors (`remat_function`: in every
training pass, the float32 arithmetic of the RG-LRU, of the norms and of
a LoRA factor's product, and the GELU gates), with JAX's recomputation
held back until the backward pass needs it.

`keras.remat` on JAX is `jax.checkpoint`: the backward pass recomputes the
block's activations from its input instead of keeping them. But nothing
makes that recomputation wait: the recomputed values depend only on the
block's input, known since the forward pass, and XLA's CPU scheduler
computes them early, so they are live as long as kept ones would have
been (the 2B's LoRA step peaked at 10.6 GiB with remat, 10.4 without).

Here, on JAX, the block's input is made to depend on the gradient of its
output before it is recomputed from (`x + 0 · g`; an `optimization_barrier`
would be dropped by the same compiler), so the recomputation cannot start
before the backward pass reaches the block, and one block's activations are
live at a time (the 2B's LoRA step with remat: 7.4 GiB).
The layer's variables are passed to the function explicitly (read through
a `keras.StatelessScope`), since a `jax.custom_vjp` function may not close
over traced values. Other backends get `keras.remat`.
"""

import keras


def remat_call(layer, fn, x, *constants):
    """`fn(x, *constants)`, rematerialised in the backward pass.

    Args:
        layer: the `keras.Layer` whose variables `fn` reads (all of them,
            its sublayers' included).
        fn: the layer's forward function of `x` and `constants`.
        x: the float input that gradients flow to.
        constants: further inputs without gradients (int positions).
    """
    if not _records_gradients():
        return fn(x, *constants)
    if keras.config.backend() != "jax":
        # TF's `recompute_grad` takes only float tensors: `constants` are
        # closed over.
        return keras.remat(lambda x: fn(x, *constants))(x)
    variables = list(layer.variables)

    def run(x, values, constants):
        with keras.StatelessScope(
            state_mapping=list(zip(variables, values, strict=True))
        ):
            return fn(x, *constants)

    values = [keras.ops.convert_to_tensor(v.value) for v in variables]
    # Only `x` waits: `w + 0 · g` of the variables would copy each weight.
    return _jax_after_gradient(run, x, values, constants)


def remat_function(fn, tensors, *constants):
    """`fn(*tensors, *constants)`, rematerialised in the backward pass, for
    a function that reads no variables.

    Args:
        fn: function of `tensors` and then `constants`.
        tensors: tuple of float tensors that gradients flow to.
        constants: further inputs without gradients (int positions).
    """
    if not _records_gradients():
        return fn(*tensors, *constants)
    if keras.config.backend() != "jax":
        return keras.remat(lambda *tensors: fn(*tensors, *constants))(*tensors)
    return _jax_after_gradient(
        lambda tensors, _, constants: fn(*tensors, *constants),
        tuple(tensors),
        (),
        constants,
    )


def _records_gradients():
    """False where no gradient can be asked for: torch outside grad mode
    (generation runs under `no_grad`), where `torch.utils.checkpoint` would
    only add its bookkeeping to each call. JAX and TensorFlow compile the
    forward function as it is when nothing differentiates it."""
    if keras.config.backend() != "torch":
        return True
    import torch

    return torch.is_grad_enabled()


def _jax_after_gradient(run, waiting, others, constants):
    """`run(waiting, others, constants)` as a `jax.custom_vjp` whose
    backward pass recomputes it, `waiting` (tensors) made to depend on the
    incoming gradient first."""
    import jax

    @jax.custom_vjp
    def rematerialised(waiting, others, constants):
        return run(waiting, others, constants)

    def forward(*inputs):
        return run(*inputs), inputs

    def backward(inputs, grad):
        waiting, others, constants = inputs
        # `x + 0 · g`, `g` one element of the incoming gradient: the
        # recomputation's input now depends on that gradient. (XLA's CPU
        # compiler drops optimization barriers before scheduling, and does
        # not fold a float times 0.)
        first = jax.tree.leaves(grad)[0]
        zero = first[(0,) * first.ndim] * 0
        waiting = jax.tree.map(lambda x: x + zero.astype(x.dtype), waiting)
        return jax.vjp(run, waiting, others, constants)[1](grad)

    rematerialised.defvjp(forward, backward)
    return rematerialised(waiting, others, constants)
