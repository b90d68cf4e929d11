"""`keras.remat` for a layer's call, with JAX's recomputation held back
until the backward pass needs it.

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
    if keras.config.backend() != "jax":
        # TF's `recompute_grad` takes only float tensors: `constants` are
        # closed over.
        return keras.remat(lambda x: fn(x, *constants))(x)
    import jax

    variables = list(layer.variables)

    def run(values, x, constants):
        with keras.StatelessScope(
            state_mapping=list(zip(variables, values, strict=True))
        ):
            return fn(x, *constants)

    @jax.custom_vjp
    def rematerialised(values, x, constants):
        return run(values, x, constants)

    def forward(values, x, constants):
        return run(values, x, constants), (values, x, constants)

    def backward(saved, grad):
        values, x, constants = saved
        # `x + 0 · g`, `g` one element of the incoming gradient: the
        # recomputation's input now depends on that gradient. (XLA's CPU
        # compiler drops optimization barriers before scheduling, and does
        # not fold a float times 0.)
        first = jax.tree.leaves(grad)[0]
        x = x + (first[(0,) * first.ndim] * 0).astype(x.dtype)
        return jax.vjp(run, values, x, constants)[1](grad)

    rematerialised.defvjp(forward, backward)
    values = [keras.ops.convert_to_tensor(v.value) for v in variables]
    return rematerialised(values, x, constants)
