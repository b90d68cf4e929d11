"""The two exported functions, `prefill` and `decode_step`, in `keras.ops`.

Shape legend: `b` batch, `c` prefill chunk length, `v` vocabulary, `d`
hidden_dim, `l` lru_width, `k` Conv1D width, `w` attention window, `h` head
dim.

The generation state is a flat list of fixed-size tensors: per residual block
its cache, then `num_tokens` and `hidden`:

    recurrent block i:  state_{i}_rg_lru  float32 [b, l]
                        state_{i}_conv1d  compute [b, k-1, l]
    attention block i:  state_{i}_keys    compute [b, w, h]
                        state_{i}_values  compute [b, w, h]
                        state_{i}_positions int32 [b, w]  (-1: empty slot)
    num_tokens          int32 [b], tokens absorbed per row
    hidden              compute [b, d], the final hidden state at each row's
                        last token (the next token's logits come from it)

Keeping `hidden` in the state lets a runtime feed a prompt in chunks: a row
whose prompt ended in an earlier chunk gets its logits from `hidden`, which
padding leaves untouched. Only the backbone's `forward_with_caches` and
`initial_caches` are used, the same forward pass as training and `generate`.
"""

import contextlib

from keras import ops

from keras_recurrentgemma.layers.local_attention import AttentionBlockCache
from keras_recurrentgemma.layers.recurrent_block import RecurrentBlockCache
from keras_recurrentgemma.layers.rg_lru import RGLRU


def state_layout(backbone):
    """Name, shape, dtype and fill value of each state tensor, in order.

    Returns:
        list of dicts `{"name", "shape", "dtype", "fill"}`; `shape[0]` is the
        string `"batch"`, the other dims ints.
    """
    dtype = backbone.compute_dtype
    layout = []
    for i, block_type in enumerate(backbone.block_types):
        if block_type == "recurrent":
            l, k = backbone.lru_width, backbone.conv1d_temporal_width
            layout += [
                _entry(f"state_{i}_rg_lru", [l], "float32"),
                _entry(f"state_{i}_conv1d", [k - 1, l], dtype),
            ]
        else:
            w, h = backbone.attention_window_size, backbone.head_dim
            layout += [
                _entry(f"state_{i}_keys", [w, h], dtype),
                _entry(f"state_{i}_values", [w, h], dtype),
                _entry(f"state_{i}_positions", [w], "int32", fill=-1),
            ]
    layout += [
        _entry("num_tokens", [], "int32"),
        _entry("hidden", [backbone.hidden_dim], dtype),
    ]
    return layout


def _entry(name, shape, dtype, fill=0):
    return {"name": name, "shape": ["batch", *shape], "dtype": dtype, "fill": fill}


def _unflatten(backbone, state):
    """The flat state list → `(block caches, num_tokens, hidden)`."""
    state = list(state)
    blocks = []
    for block_type in backbone.block_types:
        if block_type == "recurrent":
            blocks.append(RecurrentBlockCache(state.pop(0), state.pop(0)))
        else:
            blocks.append(AttentionBlockCache(state.pop(0), state.pop(0), state.pop(0)))
    num_tokens, hidden = state
    return tuple(blocks), num_tokens, hidden


def _flatten(blocks, num_tokens, hidden):
    flat = []
    for cache in blocks:
        flat.extend(cache)
    return flat + [num_tokens, hidden]


def advance(backbone, token_ids, padding_mask, state):
    """Feeds `token_ids` `[b, c]` (right padded by `padding_mask`) into `state`.

    Returns:
        `(logits, new_state)`: float32 `[b, v]`, the next token's logits
        after each row's last real token (or after the state's, for a row
        with no real token here), and the new flat state.
    """
    blocks, num_tokens, hidden = _unflatten(backbone, state)
    mask = ops.cast(padding_mask, "bool")
    counts = ops.cumsum(ops.cast(mask, "int32"), axis=1)
    # Positions continue each row's count; -1 marks padding, which leaves
    # every block's cache as it is.
    segment_pos = ops.where(mask, num_tokens[:, None] + counts - 1, -1)
    x, blocks = backbone.forward_with_caches(token_ids, segment_pos, blocks)
    lengths = counts[:, -1]
    # Column 0 is the previous hidden state, column j the j-th token's.
    both = ops.concatenate([ops.cast(hidden, x.dtype)[:, None], x], axis=1)
    index = ops.broadcast_to(
        lengths[:, None, None], (ops.shape(x)[0], 1, ops.shape(x)[2])
    )
    last = ops.take_along_axis(both, index, axis=1)
    logits = backbone.token_embedding(last, reverse=True)[:, 0]
    new_state = _flatten(
        blocks, num_tokens + lengths, ops.cast(last[:, 0], hidden.dtype)
    )
    return ops.cast(logits, "float32"), new_state


def make_endpoints(backbone):
    """`(prefill, decode_step)` as functions of flat tensor arguments.

    `prefill(token_ids [b, c] int32, padding_mask [b, c] int32, *state)` and
    `decode_step(token_ids [b, 1] int32, *state)` both return
    `(logits float32 [b, v], *new_state)`.
    """

    def prefill(token_ids, padding_mask, *state):
        logits, new_state = advance(backbone, token_ids, padding_mask, state)
        return (logits, *new_state)

    def decode_step(token_ids, *state):
        logits, new_state = advance(
            backbone, token_ids, ops.ones_like(token_ids), state
        )
        return (logits, *new_state)

    return prefill, decode_step


@contextlib.contextmanager
def reference_scan(backbone):
    """Runs every RG-LRU with the `keras.ops` reference scan meanwhile.

    Exported graphs must hold only standard ops: the fast paths are custom
    kernels (Pallas, Triton) or backend-specific ops that ONNX, TFLite and
    jax2tf cannot express.
    """
    layers = [layer for layer in backbone._flatten_layers() if isinstance(layer, RGLRU)]
    saved = [layer.scan_implementation for layer in layers]
    try:
        for layer in layers:
            layer.scan_implementation = "reference"
        yield
    finally:
        for layer, name in zip(layers, saved, strict=True):
            layer.scan_implementation = name
