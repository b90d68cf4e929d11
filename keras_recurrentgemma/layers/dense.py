"""The one way our layers make a projection (`Dense`); which layers
`quantize` may touch."""

import contextlib
import gc
import re

import keras
from keras_hub.layers import ReversibleEmbedding

from keras_recurrentgemma.layers import embedding
from keras_recurrentgemma.layers import kernel_layout
from keras_recurrentgemma.layers.initialization import initializer
from keras_recurrentgemma.layers.lora_state import LoRAStateMixin
from keras_recurrentgemma.ops.remat import remat_function
from keras_recurrentgemma.ops.xla_cpu import matmul_transposed

# The equation of every projection: the kernel is `W [out, in]`, stored as
# `nn.Linear` stores its weight (see `Dense`). `I` and `O` are the input and
# output widths, in capitals: the shape legend's `i` and `o` mean other things.
EQUATION = "btI,OI->btO"


# Named like Keras's so that weights files and error messages read as
# before.
@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class Dense(LoRAStateMixin, keras.layers.EinsumDense):
    """A projection whose kernel is stored `[out, in]`; its weights files keep
    the LoRA factors.

        y = x Wᵀ + β        x: [b, t, in], W: [out, in], β: [out]

    The kernel is stored output by input (`nn.Linear`'s and the HF
    checkpoints' layout), not Keras `Dense`'s `[in, out]`: a decode step
    multiplies one row by every kernel, and that product reads `W` along
    its rows, which is what the CPU libraries do at memory speed. Measured
    on this project's CPU, one row times each of eight bfloat16 kernels of
    the 2B's MLP (2560 by 7680), per product: XLA 0.9 ms stored `[out, in]`
    against 4.7 stored `[in, out]`; TensorFlow 1.1 against 2.4 (torch's
    `nn.Linear`, 1.1). A tensor has no strides on JAX or TensorFlow, so the
    layout must be the variable's own. It is a `keras.layers.EinsumDense`,
    whose LoRA (`A [out, r]`, `B [r, in]`) and int8 / int4 / float8
    quantization Keras defines for any equation. In float32 torch
    multiplies one row faster by a kernel stored `[in, out]` (the `cpu7m`
    config decodes 4% under HF at batch 8); the released models are
    bfloat16.

    Overrides Keras's `save_own_variables` / `load_own_variables`: a weights
    file of a LoRA layer (`save_weights`, `ModelCheckpoint`,
    `BackupAndRestore`) also holds the unmerged kernel and both factors, so
    loading it into a LoRA model resumes training exactly, where Keras would
    merge the factors into the kernel and zero them. The merged kernel stays
    the file's first entry, as Keras writes it. See `lora_state`. Each
    entry also says it is `[out, in]`, so that files written before
    (`[in, out]`) still load (`kernel_layout`).

    Args:
        units: int. Output width `out`.
        use_bias: bool. Whether to add `β`.
        **kwargs: `keras.layers.EinsumDense` arguments (`kernel_initializer`,
            `dtype`, `name`, ...).
    """

    def __init__(self, units, use_bias=True, **kwargs):
        super().__init__(
            EQUATION,
            output_shape=(None, units),
            bias_axes="O" if use_bias else None,
            **kwargs,
        )
        self.units = units
        self.use_bias = use_bias
        # See `call`: whether a training pass keeps `x` or its float32 copy.
        self.rematerialise = True

    def save_own_variables(self, store):
        super().save_own_variables(store)
        kernel_layout.mark(store)

    def load_own_variables(self, store):
        # A file from before the `[out, in]` layout reads as today's.
        quantized = self.quantization_mode is not None
        super().load_own_variables(kernel_layout.current(store, self.path, quantized))

    def get_config(self):
        config = super().get_config()
        for name in ("equation", "output_shape", "bias_axes"):
            config.pop(name)
        return {**config, "units": self.units, "use_bias": self.use_bias}

    def call(self, inputs, training=None):
        """Keras's float call; with LoRA on, the factors applied unmerged:

            y = x Wᵀ + (α / r) · (x Bᵀ) Aᵀ        A: [out, r], B: [r, in]

        Keras's float call multiplies by its `kernel` property, which
        builds `W + (α / r) · A B`: a new `[out, in]` tensor in every call,
        which the backward pass then keeps for each target layer until the
        gradients are done (at the 2B: a second copy of every target
        kernel, plus its gradient, in each training step). This keeps only
        `x Bᵀ` (`[b, t, r]`), as Keras's own quantized LoRA call does, and
        `x` in its own dtype (Keras's factors are float32). Equal to
        Keras's up to rounding: the sum is taken after the products, not
        before.
        """
        # `xla_cpu.matmul_transposed`: the product `keras.ops` gives,
        # without XLA's float32 copy of a bfloat16 kernel on a CPU.
        outputs = matmul_transposed(inputs, self._kernel)
        if not self.lora_enabled:
            return self._finish(outputs)
        ops = keras.ops
        factor = ops.convert_to_tensor(self.lora_kernel_b)
        dtypes = {keras.backend.standardize_dtype(t.dtype) for t in (inputs, factor)}
        if self.rematerialise and len(dtypes) == 2:
            # A 16-bit `x` times the float32 factor is a product of `x`'s
            # float32 copy, which the backward pass would keep for `B`'s
            # gradient (the 2B's LoRA step: 260 MiB at 512 tokens); `x`
            # itself is kept instead, and cast again there.
            low_rank = remat_function(matmul_transposed, (inputs, factor))
        else:
            low_rank = matmul_transposed(inputs, factor)
        low_rank = ops.matmul(low_rank, ops.transpose(self.lora_kernel_a))
        # The factors may be float32 under a 16-bit kernel; like Keras's
        # merged kernel, their term is cast to the output's dtype.
        low_rank = ops.cast(
            low_rank * (self.lora_alpha / self.lora_rank), outputs.dtype
        )
        return self._finish(ops.add(outputs, low_rank))

    def float_kernel_shape(self):
        """`(out, in)`, the float kernel's shape, also for a quantized layer
        (Keras records it where int4 packs the kernel into another)."""
        shape = getattr(self, "original_kernel_shape", None) or self._kernel.shape
        return tuple(int(n) for n in shape)

    def _finish(self, outputs):
        if self.bias is not None:
            outputs = keras.ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


# Keras has integer kernels for exactly these classes and refuses subclasses
# (their `call` could read the float kernel); our `Dense` changes only how
# weights are saved and its float call, so it is listed too. KerasHub's
# `ReversibleEmbedding` is an empty subclass of Keras's, refused only by that
# type check, so it is listed here and the check is done by
# `quantizable_layers` instead. So is our `embedding.ReversibleEmbedding`,
# which changes only the float reverse call (a quantized layer runs Keras's
# `quantized_call`, never `call`). The RG-LRU gates (`BlockDiagonalLinear`),
# `a_param`, `Conv1D` and the norms are not in the list: they stay in float.
QUANTIZABLE_TYPES = (
    Dense,
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
    keras.layers.ReversibleEmbedding,
    ReversibleEmbedding,
    embedding.ReversibleEmbedding,
)
EMBEDDING_TYPES = QUANTIZABLE_TYPES[3:]
# Keras quantizes embeddings in these modes only.
EMBEDDING_MODES = ("int8", "int4")
# Modes that quantize each layer on its own. GPTQ and AWQ also need
# calibration data and a block structure that this model does not describe;
# Keras would rewrite the layers before finding that out.
LAYERWISE_MODES = ("int8", "int4", "float8")


def fan_in_dense(units, name, dtype, use_bias=True, scale=1.0):
    """Dense layer with the official fan-in normal initialisation.

    `scale` shrinks the variance of output projections (`2 / num_layers` in
    Griffin), which matters only when training from scratch.
    """
    return Dense(
        units,
        use_bias=use_bias,
        kernel_initializer=initializer(
            keras.initializers.VarianceScaling(
                scale, mode="fan_in", distribution="normal"
            )
        ),
        dtype=dtype,
        name=name,
    )


def quantizable_layers(filters=None, mode=None):
    """A `filters` callable for `keras.Model.quantize` with `type_check=False`.

    Selects layers whose exact type is in `QUANTIZABLE_TYPES` (embeddings
    only in `EMBEDDING_MODES`) and that also match `filters`, given as
    `Model.quantize` takes it: a regex searched in the layer's name, a list
    of them (any may match), or a callable.
    """
    # Keras's own check of `filters` only ever sees the callable returned.
    if filters is not None and not isinstance(filters, (str, list, tuple)):
        if not callable(filters):
            raise ValueError(
                "`filters` must be a regex string, a list of regex strings or a "
                f"callable; got {type(filters).__name__}."
            )
    patterns = [filters] if isinstance(filters, str) else filters

    def accept(layer):
        if type(layer) not in QUANTIZABLE_TYPES:
            return False
        if type(layer) in EMBEDDING_TYPES and mode not in EMBEDDING_MODES:
            return False
        if filters is None:
            return True
        if callable(filters):
            return bool(filters(layer))
        return any(re.search(p, layer.name) for p in patterns)

    return accept


@contextlib.contextmanager
def no_collect():
    """`gc.collect()` does nothing for the scope: wraps every `quantize`.

    `quantize` deletes each float kernel, and Keras's `Layer.__delattr__`
    runs a full `gc.collect()` for every variable deleted: 0.4 to 1.6 s a
    call beside a loaded model's heap, most of a quantizing load's time,
    and 0.27 s a kernel even in a test process. The kernels are freed by
    their reference counts anyway (checked with weak references, garbage
    collection off, on every backend). A frozen heap (`gc.freeze`) only
    cut this by 4x.
    """
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect


def check_quantization_mode(mode, config=None):
    """Raises `ValueError` for a mode this model cannot be quantized in."""
    resolved = getattr(config, "mode", None) if mode is None else mode
    if resolved in ("gptq", "awq"):
        raise ValueError(
            f"quantize(mode={resolved!r}) is not supported for RecurrentGemma; "
            f"use one of {LAYERWISE_MODES}."
        )


def resolve_policies(model):
    """Gives each layer of a model built with a `DTypePolicyMap` its own entry.

    A layer built under the map keeps the whole map as its policy. Keras's
    `quantization_mode` property looks the layer up in it, but the quantized
    layers' own save paths (`Embedding._get_embeddings_with_merged_lora` and
    its Dense twins, Keras 3.14) read `self.dtype_policy.quantization_mode`,
    which on the map is `None`: they then save a scale of `None` and fail.
    The model's own policy stays the map, which KerasHub's
    `Backbone.get_config` serializes. `_dtype_policy` is private; the public
    setter would write into the shared map instead. The backbone's
    constructor calls this, so every way of building one (a preset, a
    `.keras` file, a config) gets it. Returns `model`.
    """
    for layer in model._flatten_layers(include_self=False):
        policy = layer._dtype_policy
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap) and layer.path:
            layer._dtype_policy = policy[layer.path]
    return model
