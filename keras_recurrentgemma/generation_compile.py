"""Compiling generation code for the backend: one `compile_for_backend`.

`RecurrentGemmaCausalLM.make_generate_function` (the whole `generate_step`
and, on torch, the per-token step) and `generation_functions` (streaming's
prefill, first logits and decode step) are compiled here, and nowhere else.
"""

import contextlib
import functools
import itertools
from typing import NamedTuple

import keras
from keras import ops

from keras_recurrentgemma import compiled_decode
from keras_recurrentgemma import generation


def no_grad():
    """torch's `no_grad` (generation records no autograd graph, which would
    hold every chunk's activations); nothing on other backends."""
    if keras.config.backend() != "torch":
        return contextlib.nullcontext()
    import torch

    return torch.no_grad()


def compile_for_backend(
    fn,
    model,
    *,
    tensorflow_xla=True,
    torch_mode=None,
    static_argnames=(),
    sampler=None,
):
    """`fn` compiled as the backend runs generation code.

    `fn` is a pure function of tensors (and `NamedTuple`s of them) that
    reads `model`'s variables.

    - `model.run_eagerly`: `fn` as it is (under `no_grad` on torch).
    - JAX: `jax.jit`, the model's variables (and `sampler`'s seed state)
      passed as arguments through a `keras.StatelessScope`, as KerasHub's
      `generate` does: one compilation serves any weights, none are baked
      in, and `sampler`'s updated seed state is written back after a call.
    - TensorFlow: `tf.function`, with XLA if `tensorflow_xla`.
    - torch: under `no_grad`; or, given a `torch_mode` (a per-token step),
      a `compiled_decode.TorchDecodeStep` in that mode (`"graph"` and
      `"inductor"` trace it once per signature), to call through
      `bound_step`.

    Args:
        static_argnames: JAX: keyword arguments that are Python constants.
        sampler: JAX: a `keras_hub` sampler whose variables `fn` updates.
    """
    backend = keras.config.backend()
    if backend == "torch":
        if torch_mode is None:
            return _under_no_grad(fn)
        return compiled_decode.TorchDecodeStep(fn, torch_mode)
    if model.run_eagerly:
        return fn
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=tensorflow_xla)
    if backend == "jax":
        return _jax_stateless(fn, model, static_argnames, sampler)
    return fn


class GenerationFunctions(NamedTuple):
    """The per-token computations of streaming, each compiled.

    Attributes:
        prefill: `fn(token_ids [b, t], padding_mask [b, t], cache)` → cache.
        first_logits: `fn(cache)` → logits `[b, v]` (`next_token_logits`).
        decode: `decode_step(token, upcoming, index, cache)`; call it through
            `bound_step`.
    """

    prefill: object
    first_logits: object
    decode: object


def compile_functions(causal_lm, compile_fn):
    """`GenerationFunctions` of `causal_lm`, each through `compile_fn` (its
    `compile_for_backend` settings); the decode step in `torch_decode_mode`."""
    backbone = causal_lm.backbone

    def prefill(token_ids, padding_mask, cache):
        return generation.advance(backbone, token_ids, cache, padding_mask)[2]

    def first_logits(cache):
        return generation.next_token_logits(backbone, cache)

    def decode(token, upcoming, index, cache):
        return generation.decode_step(backbone, token, upcoming, index, cache)

    return GenerationFunctions(
        compile_fn(prefill),
        compile_fn(first_logits),
        compile_fn(decode, torch_mode=causal_lm.torch_decode_mode),
    )


def variables_key(model):
    """A key that changes when `model`'s set of variables does (LoRA,
    quantization), so a traced torch step is not reused across them."""
    return tuple(id(v) for v in model.variables)


def bound_step(step, model, steps=None):
    """`step` from `compile_for_backend`, ready to call per token.

    A torch step runs under `no_grad` and, when traced, is told
    `variables_key(model)` (computed here, once per generation) and how
    many `steps` the caller will take at most (`None`: unknown), which
    decides whether `"auto"` traces.
    """
    if not isinstance(step, compiled_decode.TorchDecodeStep):
        return step
    key = None if step.mode == "eager" else variables_key(model)
    return _under_no_grad(
        functools.partial(step, variables_key=key, planned_steps=steps)
    )


def _under_no_grad(fn):
    def call(*args, **kwargs):
        # Per call: a `with` around a generator would also cover the
        # caller's code between tokens.
        with no_grad():
            return fn(*args, **kwargs)

    return call


def _jax_stateless(fn, model, static_argnames, sampler):
    import jax

    def variables(kind):
        if kind == "sampler":
            return [] if sampler is None else list(sampler.variables)
        return list(getattr(model, kind))

    kinds = ("sampler", "trainable_variables", "non_trainable_variables")

    @functools.partial(jax.jit, static_argnames=static_argnames)
    def stateless(state, *args, **kwargs):
        mapping = itertools.chain(
            *(
                zip(variables(kind), values, strict=True)
                for kind, values in zip(kinds, state, strict=True)
            )
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = fn(*args, **kwargs)
        seeds = [scope.get_current_value(v) for v in variables("sampler")]
        seeds = [
            new if new is not None else v
            for new, v in zip(seeds, state[0], strict=True)
        ]
        return outputs, seeds

    def call(*args, **kwargs):
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        # `.value` keeps a distributed variable's sharding.
        state = [[v.value for v in variables(kind)] for kind in kinds]
        args = keras.tree.map_structure(ops.convert_to_tensor, args)
        outputs, seeds = stateless(state, *args, **kwargs)
        for v, value in zip(variables("sampler"), seeds, strict=True):
            v.assign(value)
        return outputs

    return call
