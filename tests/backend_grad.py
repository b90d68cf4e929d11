"""Gradients of a `keras.ops` function on whichever backend is active."""

import keras
import numpy as np


def value_and_grad(fn, *args):
    """Returns `(fn(*args), [d fn / d arg for arg in args])` as numpy.

    `fn` must return a scalar; `args` are numpy float arrays.
    """
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(
            *[jax.numpy.asarray(a) for a in args]
        )
        return np.asarray(value), [np.asarray(g) for g in grads]
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.Variable(a) for a in args]
        with tf.GradientTape() as tape:
            value = fn(*tensors)
        grads = tape.gradient(value, tensors)
        # A gather's gradient comes as `IndexedSlices`; made dense here.
        return value.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]
    if backend == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in args]
        value = fn(*tensors)
        value.backward()
        return value.detach().numpy(), [t.grad.numpy() for t in tensors]
    raise NotImplementedError(backend)
