"""The training loss computed a chunk of tokens at a time.

`fit` with `compile(loss="auto")` (the default) computes the cross-entropy
from the backbone's hidden states in chunks of `loss_chunk_size` tokens,
never from the full `[b, t, vocab]` logits:

    z_c = cap · tanh((h_c / cap) Eᵀ)                       [b, c, v] float32
    s_c = Σ_{i ∈ c} w_i · (logsumexp_v z_{c,i} − z_{c,i,y_i})          scalar
    loss = (Σ_c s_c) / Σ_i w_i                  (0 when every w_i is 0)

with `h` the hidden states `[b, t, d]`, `E` the tied embedding `[v, d]`, `y`
the labels `[b, t]`, `w` the sample weights `[b, t]` (ones when none are
given) and `c` a slice of at most `loss_chunk_size` positions along `t`.
This is exactly Keras's `SparseCategoricalCrossentropy(from_logits=True,
reduction="mean_with_sample_weight")` on the full logits, summed in another
order.

Each chunk's logits are made inside `keras.remat`, so the backward pass
recomputes them instead of keeping them: the logits, their float32 copy,
softmax and gradient exist for one chunk at a time instead of for all `t`
tokens. With the released models' `v` = 256000, one float32 `[c, v]` array
is 1 MB per token: 128 MB per row for a 128-token chunk, where the full path
holds several `[t, v]` arrays. The price is one more `[c, d] × [d, v]`
product per chunk in the backward pass, and one more (without gradient)
when `compile` has metrics (`weighted_metrics="auto"` has accuracy): they
are updated a chunk at a time too, each token taken as one sample, which
gives the values the full logits give for per-token metrics (accuracy and
Keras's other mean metrics: they only accumulate sums). Metrics keep state,
so their chunks are not in the loss's scan, and XLA may compute several at
once (on CPU, 1024 tokens in chunks of 128, `v` = 32000: 127 MiB of
temporaries against 49 MiB without metrics); `weighted_metrics=[]` avoids
that.

Shape legend: `b` batch, `t` tokens, `c` tokens in a chunk, `d` hidden_dim,
`v` vocabulary_size.
"""

import numbers

import keras
from keras import ops
from keras.src.losses.loss import scale_loss_for_distribution

# A LoRA step of the 2B (torch, remat, 512 tokens) peaked 0.85 GiB lower
# with 128 than with 256, in the same time (10.7 s). Without remat, where
# the loss's chunks come on top of every block's kept activations, 64
# peaked 0.25 GiB lower than 128 on torch (7.83 GiB against 8.08) and 0.16
# on JAX (8.25 against 8.41), each vocabulary product still 64 rows.
DEFAULT_LOSS_CHUNK_SIZE = 64


def check_loss_chunk_size(loss_chunk_size):
    """`loss_chunk_size` as an int, or `None` (no chunking).

    Raises:
        ValueError: for anything but `None` or a positive int.
    """
    if loss_chunk_size is None:
        return None
    if isinstance(loss_chunk_size, bool) or not isinstance(
        loss_chunk_size, numbers.Integral
    ):
        raise ValueError(
            "`loss_chunk_size` must be a positive int (tokens per chunk of "
            f"logits) or None (the full logits at once); got {loss_chunk_size!r}."
        )
    if loss_chunk_size < 1:
        raise ValueError(
            "`loss_chunk_size` must be a positive int (tokens per chunk of "
            f"logits) or None (the full logits at once); got {loss_chunk_size}."
        )
    return int(loss_chunk_size)


def _static_length(hidden):
    t = ops.shape(hidden)[1]
    return t if isinstance(t, int) else None


def _check_targets(hidden, labels, sample_weight):
    """Labels `[b, t]` and float32 weights `[b, t]` (or `None`)."""
    if len(hidden.shape) != 3:
        raise ValueError(
            f"The chunked loss takes hidden states [batch, seq, hidden_dim]; got "
            f"shape {tuple(hidden.shape)}."
        )
    labels = _per_token(
        labels,
        "int32",
        "The chunked loss takes integer labels [batch, seq]; got shape {shape}. "
        "Pass `compile(loss=...)` for other targets.",
    )
    if sample_weight is None:
        return labels, None
    sample_weight = _per_token(
        sample_weight,
        "float32",
        "The chunked loss takes a `sample_weight` per token, [batch, seq]; "
        "got shape {shape}.",
    )
    return labels, sample_weight


def _per_token(values, dtype, message):
    """`values` as a `[b, t]` tensor of `dtype` (a trailing axis of 1
    dropped), else a ValueError of `message` formatted with the shape."""
    values = ops.convert_to_tensor(values)
    if len(values.shape) == 3 and values.shape[-1] == 1:
        values = ops.squeeze(values, axis=-1)
    if len(values.shape) != 2:
        raise ValueError(message.format(shape=tuple(values.shape)))
    return ops.cast(values, dtype)


def chunked_cross_entropy(
    logits_fn,
    hidden,
    labels,
    sample_weight=None,
    chunk_size=DEFAULT_LOSS_CHUNK_SIZE,
    on_chunk=None,
):
    """The mean cross-entropy over real tokens, one chunk of logits at a time.

    See the module docstring for the equation. A sequence whose length is
    not known when the step is traced (TensorFlow with varying lengths) is
    taken as one chunk: still rematerialised, but its logits are whole.

    Args:
        logits_fn: callable `[b, c, d] -> [b, c, v]`, e.g.
            `lambda h: backbone.token_embedding(h, reverse=True)`. Its
            output is cast to float32 before the softmax.
        hidden: float tensor `[b, t, d]`.
        labels: int tensor `[b, t]`.
        sample_weight: optional float tensor `[b, t]`; 0 marks padding.
        chunk_size: int. At most this many tokens per chunk: `t` is cut
            into `n = ⌈t / chunk_size⌉` chunks of `⌈t / n⌉` tokens, the
            last one padded with positions of weight 0.
        on_chunk: optional `fn(labels [b·c], logits [b·c, v],
            sample_weight [b·c] or None)`, called per chunk with logits that
            carry no gradient, one token per row; `compile`'s metrics go
            through it.

    Returns:
        float32 scalar: `Σ w · cross-entropy / Σ w`, scaled for the
        distribution strategy as Keras's own losses are.
    """
    chunk_size = check_loss_chunk_size(chunk_size)
    if chunk_size is None:
        raise ValueError("`chunk_size` must be a positive int; got None.")
    labels, weights = _check_targets(hidden, labels, sample_weight)
    loss_weights = weights
    if loss_weights is None:
        loss_weights = ops.ones(ops.shape(labels), "float32")
    t = _static_length(hidden)
    n = 1 if t is None else -(-t // chunk_size)
    c = t if t is None else -(-t // n)  # n chunks of c tokens, the last ≤ c
    if n == 1:
        total = _chunk_sum(logits_fn, hidden, labels, loss_weights)
    elif keras.config.backend() == "tensorflow":
        # TensorFlow cannot differentiate `recompute_grad` inside a graph
        # while loop ("... not in internal_capture_to_output"), so its chunks
        # are unrolled; its executor frees each chunk's tensors once used.
        total = ops.zeros((), "float32")
        for start in range(0, t, c):
            end = min(start + c, t)
            total = total + _chunk_sum(
                logits_fn,
                hidden[:, start:end],
                labels[:, start:end],
                loss_weights[:, start:end],
            )
    else:
        total = _scan_chunks(logits_fn, hidden, labels, loss_weights, n, c)
    if on_chunk is not None:
        starts = [None] if t is None else range(0, t, c)
        for start in starts:
            if start is None:
                h, y, w = hidden, labels, weights
            else:
                end = min(start + c, t)
                h, y = hidden[:, start:end], labels[:, start:end]
                w = None if weights is None else weights[:, start:end]
            logits = ops.stop_gradient(logits_fn(ops.stop_gradient(h)))
            logits = ops.cast(logits, "float32")
            # One token per sample: Keras metrics average each sample over
            # its positions first, which would weight a short last chunk's
            # tokens more than the others.
            on_chunk(
                ops.reshape(y, (-1,)),
                ops.reshape(logits, (-1, ops.shape(logits)[-1])),
                None if w is None else ops.reshape(w, (-1,)),
            )
    if weights is None:
        shape = ops.shape(labels)
        count = ops.cast(shape[0], "float32") * ops.cast(shape[1], "float32")
    else:
        count = ops.sum(weights)
    return scale_loss_for_distribution(ops.divide_no_nan(total, count))


def _scan_chunks(logits_fn, hidden, labels, weights, n, c):
    """`Σ w · cross-entropy` over `n` chunks of `c` tokens, one after another.

    The sequence is padded to `n · c` tokens with weight-0 positions (fewer
    than `n`). A scan orders the chunks: unrolled, XLA may schedule every
    chunk's logits at once (it did on CPU, with 5× the scan's temporary
    memory at 1024 tokens and 8 chunks). On torch `ops.scan` is a Python
    loop, run eagerly, so it is in order anyway.
    """
    pad = n * c - ops.shape(hidden)[1]

    def stack(x):
        x = ops.pad(x, [[0, 0], [0, pad]] + [[0, 0]] * (len(x.shape) - 2))
        x = ops.reshape(x, (-1, n, c) + tuple(x.shape[2:]))
        return ops.moveaxis(x, 1, 0)  # [n, b, c, ...]

    def step(total, chunk):
        h, y, w = chunk
        return total + _chunk_sum(logits_fn, h, y, w), ops.zeros(())

    total, _ = ops.scan(
        step,
        ops.zeros((), "float32"),
        (stack(hidden), stack(labels), stack(weights)),
    )
    return total


def _chunk_sum(logits_fn, h, y, w):
    """`Σ w · cross-entropy` of one chunk `h` `[b, c, d]`, rematerialised.

    Only `h` is an argument: TensorFlow's `recompute_grad` takes positional
    float tensors alone, so the labels and weights are closed over.
    """

    def chunk_sum(h):
        logits = ops.cast(logits_fn(h), "float32")
        losses = ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return ops.sum(losses * w)

    return keras.remat(chunk_sum)(h)
