"""The one way our layers make a `keras.layers.Dense`; which layers
`quantize` may touch."""

import re

import keras
from keras_hub.layers import ReversibleEmbedding

from keras_recurrentgemma.layers import embedding
from keras_recurrentgemma.layers.initialization import initializer
from keras_recurrentgemma.layers.lora_state import LoRAStateMixin
from keras_recurrentgemma.ops.matmul_layout import column_major
from keras_recurrentgemma.ops.xla_cpu import matmul


# Named like its parent so that weights files and error messages read as
# before. Only `save_own_variables` / `load_own_variables` change.
@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class Dense(LoRAStateMixin, keras.layers.Dense):
    """`keras.layers.Dense` whose weights files keep the LoRA factors.

    Overrides Keras's `save_own_variables` / `load_own_variables`: a weights
    file of a LoRA layer (`save_weights`, `ModelCheckpoint`,
    `BackupAndRestore`) also holds the unmerged kernel and both factors, so
    loading it into a LoRA model resumes training exactly, where Keras would
    merge the factors into the kernel and zero them. The merged kernel stays
    the file's first entry, as Keras writes it. See `lora_state`.

    On torch on a CPU a bfloat16 kernel is stored column-major, the layout
    torch multiplies fastest there (`ops.matmul_layout`); its shape and
    values are Keras's.
    """

    def add_weight(self, *args, **kwargs):
        if kwargs.get("name") == "kernel" and "initializer" in kwargs:
            kwargs["initializer"] = column_major(kwargs["initializer"])
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, training=None):
        """Keras's float call; with LoRA on, the factors applied unmerged:

            y = x W + (α / r) · (x A) B        x: [..., i], A: [i, r], B: [r, o]

        Keras's float call multiplies by its `kernel` property, which
        builds `W + (α / r) · A B`: a new `[i, o]` tensor in every call,
        which the backward pass then keeps for each target layer until the
        gradients are done (at the 2B: a second copy of every target
        kernel, plus its `[i, o]` gradient, in each training step). This
        keeps only `x A` (`[..., r]`), as Keras's own quantized LoRA call
        does. Equal to Keras's up to rounding: the sum is taken after the
        products, not before.
        """
        # `xla_cpu.matmul`: the product `keras.ops.matmul` gives, without
        # XLA's float32 copy of a bfloat16 kernel on a CPU.
        outputs = matmul(inputs, self._kernel)
        if not self.lora_enabled:
            return self._finish(outputs)
        low_rank = keras.ops.matmul(
            keras.ops.matmul(inputs, self.lora_kernel_a), self.lora_kernel_b
        )
        # The factors may be float32 under a 16-bit kernel; like Keras's
        # merged kernel, their term is cast to the output's dtype.
        low_rank = keras.ops.cast(
            low_rank * (self.lora_alpha / self.lora_rank), outputs.dtype
        )
        return self._finish(keras.ops.add(outputs, low_rank))

    def _finish(self, outputs):
        if self.bias is not None:
            outputs = keras.ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


# Keras has integer kernels for exactly these classes and refuses subclasses
# (their `call` could read the float kernel); our `Dense` changes only how
# weights are saved, so it is listed too. KerasHub's `ReversibleEmbedding`
# is an empty subclass of Keras's, refused only by that type check, so it is
# listed here and the check is done by `quantizable_layers` instead. So is our
# `embedding.ReversibleEmbedding`, which changes only the float reverse call
# (a quantized layer runs Keras's `quantized_call`, never `call`). The RG-LRU
# gates (`BlockDiagonalLinear`), `a_param`, `Conv1D` and the norms are
# not in the list: they stay in float.
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
