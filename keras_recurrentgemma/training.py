"""The training side of `RecurrentGemmaCausalLM`: the chunked loss in `fit`.

A mixin before KerasHub's `CausalLM`. With `compile(loss="auto")` (which
sets `_loss_chunk_size`), `train_step` has `call` return the hidden states
and `compute_loss` makes the logits `_loss_chunk_size` tokens at a time
(`keras_recurrentgemma.chunked_loss`), updating the metrics per chunk, so
the `[batch, seq, vocab]` logits are never held. Also loss scaling for pure
float16 and `fit`'s warnings; on torch on a CPU, glibc's `malloc` is told
once to return large freed blocks, and on JAX the heaps are trimmed after
each long compile (`utils/host_malloc.py`).
"""

import sys
import warnings

import keras

from keras_recurrentgemma import chunked_loss
from keras_recurrentgemma.convert.backend_arrays import own_host_weights
from keras_recurrentgemma.utils import host_malloc


class TrainingMixin:
    """`train_step`, `compute_loss`, `compute_metrics` and `fit` for the
    causal LM; see the module docstring."""

    # Set by `compile(loss="auto")`; `None` means the full logits.
    _loss_chunk_size = None
    # True while `train_step` runs with the chunked loss: `call` returns
    # hidden states and `compute_loss` makes the logits chunk by chunk.
    _chunked_loss_step = False

    def train_step(self, *args, **kwargs):
        if keras.config.backend() == "torch" and _on_cpu(self):
            # glibc would otherwise keep, fragmented, what each step frees
            # (`utils/host_malloc.py`); once per process.
            host_malloc.limit_heap_retention()
        # Only inside the step does `call` return hidden states (for
        # `compute_loss`); `model(x)`, `predict` and `evaluate` get logits.
        self._chunked_loss_step = self._loss_chunk_size is not None
        try:
            return super().train_step(*args, **kwargs)
        finally:
            self._chunked_loss_step = False

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if not self._chunked_loss_step:
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        # `y_pred` is the hidden states. The metrics are updated here, a
        # chunk of logits at a time: on JAX only this call sees the weights.
        metrics = self._compile_metrics
        if metrics is not None and metrics.built and not metrics.metrics:
            metrics = None
        loss = chunked_loss.chunked_cross_entropy(
            lambda h: self.backbone.token_embedding(h, reverse=True),
            y_pred,
            y,
            sample_weight,
            self._loss_chunk_size,
            on_chunk=None if metrics is None else metrics.update_state,
        )
        for extra in self.losses:
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self._chunked_loss_step:
            return self.get_metrics_result()  # updated by `compute_loss`
        return super().compute_metrics(x, y, y_pred, sample_weight)

    # JAX's steps donate the weights, which XLA can only do with memory of
    # its own: weights a load left in host arrays are copied first, one at a
    # time (`convert.backend_arrays.own_host_weights`), not all at once by XLA.
    # Only when a step is built: `train_on_batch` asks for it every batch.
    def make_train_function(self, force=False):
        if force or self.train_function is None:
            _before_building_a_step(self)
        return super().make_train_function(force)

    def make_test_function(self, force=False):
        if force or self.test_function is None:
            _before_building_a_step(self)
        return super().make_test_function(force)

    def make_predict_function(self, force=False):
        if force or self.predict_function is None:
            _before_building_a_step(self)
        return super().make_predict_function(force)

    def _scale_float16_loss(self, auto_scale_loss):
        if self.backbone.compute_dtype != "float16" or self.optimizer is None:
            return
        # Small float16 gradients flush to zero without loss scaling, whatever
        # the variables' dtype; Keras checks for the name "mixed_float16".
        if auto_scale_loss and not isinstance(
            self.optimizer, keras.optimizers.LossScaleOptimizer
        ):
            self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)

    def fit(self, *args, **kwargs):
        """KerasHub's `fit`, warning first if float16 weights would train.

        Raw inputs (strings, arrays) go through KerasHub's pipeline, which
        turns them into a dataset in their given order; Keras then warns
        that its default `shuffle=True` is ignored. That warning is dropped
        unless `shuffle` was passed: the default was not the user's doing.
        Shuffle raw data beforehand, or pass a shuffled dataset.
        """
        trained = [v.path for v in self.trainable_weights if v.dtype == "float16"]
        if trained:
            warnings.warn(
                f"{len(trained)} trainable weights are float16 (e.g. "
                f"{trained[0]}): the optimizer keeps its moments in float16 "
                "too, where they underflow and training diverges. Fine-tune "
                'with `dtype="mixed_float16"` (float32 weights), or call '
                "`backbone.enable_lora(rank)`, whose factors are float32.",
                stacklevel=2,
            )
        args, kwargs, distribution = _shard_across_processes(args, kwargs)
        with warnings.catch_warnings():
            if "shuffle" not in kwargs:
                warnings.filterwarnings(
                    "ignore", message="`shuffle=True` was passed, but will be ignored"
                )
            try:
                return super().fit(*args, **kwargs)
            finally:
                if distribution is not None:
                    distribution.auto_shard_dataset = True


def _before_building_a_step(model):
    own_host_weights(model)
    if keras.config.backend() == "jax":
        # The step's compile would otherwise leave its freed memory in
        # glibc's heaps, under the step's buffers (`utils/host_malloc.py`).
        host_malloc.trim_after_compiles()


def _on_cpu(model):
    # One variable, as `torch_decode_mode` reads it: `trainable_variables`
    # would walk every layer at every step.
    return model.backbone.token_embedding.embeddings.value.device.type == "cpu"


def _shard_across_processes(args, kwargs):
    """Gives this process its share of a `tf.data` dataset before KerasHub's
    pipeline sees it.

    Under a multi-process `keras.distribution`, Keras shards the dataset
    `fit` gets by reading its batch size from the dataset's graph. KerasHub
    maps its preprocessing over the dataset first, after which that size is
    unknown and Keras refuses. So the user's dataset is sharded here, while
    its batch size is still readable, and Keras is told not to shard again
    for this call.

    Returns:
        `(args, kwargs, distribution)`: `distribution` is the one whose
        `auto_shard_dataset` was turned off (to turn back on), else `None`.
    """
    distribution = keras.distribution.distribution()
    tf = sys.modules.get("tensorflow")  # Not imported: `x` is no tf dataset.
    if distribution is None or tf is None or not distribution.auto_shard_dataset:
        return args, kwargs, None
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, tf.data.Dataset):
        return args, kwargs, None
    sharded = distribution.distribute_dataset(x)
    if sharded is x:  # One process: nothing to split.
        return args, kwargs, None
    if args:
        args = (sharded, *args[1:])
    else:
        kwargs = {**kwargs, "x": sharded}
    distribution.auto_shard_dataset = False
    return args, kwargs, distribution
