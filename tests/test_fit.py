"""Training: packed documents, bfloat16 weights, rematerialised blocks."""

import warnings

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaCausalLM
from tests.models import tiny_causal_lm
from tests.tolerances import relative_error

DOCUMENTS = [
    "The quick brown fox.",
    "Hello there",
    "A much longer document that will not fit in a single row of the batch.",
    "",
    "Short one",
]


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def split_segments(x, y, row):
    """`(inputs, labels)` of each document segment in a packed row."""
    mask = x["padding_mask"][row].astype(bool)
    starts = np.flatnonzero((x["segment_pos"][row] == 0) & mask)
    ends = list(starts[1:]) + [int(mask.sum())]
    return [
        (x["token_ids"][row, s:e], y[row, s:e])
        for s, e in zip(starts, ends, strict=True)
    ]


def test_pack_keeps_documents_whole_and_labels_inside_them():
    lm = tiny_causal_lm("griffin")
    preprocessor = lm.preprocessor
    tokenizer = preprocessor.tokenizer
    length = 12
    x, y, sample_weight = preprocessor.pack(DOCUMENTS, sequence_length=length)
    assert set(x) == {"token_ids", "padding_mask", "segment_pos"}
    for value in (*x.values(), y, sample_weight):
        assert value.shape == x["token_ids"].shape
        assert value.shape[1] == length
    np.testing.assert_array_equal(sample_weight, x["padding_mask"])
    # Several documents share a row.
    assert max(len(split_segments(x, y, row)) for row in range(len(x["token_ids"]))) > 1

    pieces = [
        np.append(inputs, labels[-1])
        for row in range(len(x["token_ids"]))
        for inputs, labels in split_segments(x, y, row)
    ]
    for row in range(len(x["token_ids"])):
        for inputs, labels in split_segments(x, y, row):
            # Each label is the next token of the same document.
            np.testing.assert_array_equal(inputs[1:], labels[:-1])
            assert len(inputs) <= length
    # Rebuild the documents: consecutive pieces of a cut document share one
    # token; every document is `<bos> ids <eos>`, in order.
    rebuilt, current = [], []
    for piece in pieces:
        piece = list(piece)
        if current and current[-1] != tokenizer.end_token_id:
            assert piece[0] == current[-1]
            current += piece[1:]
        else:
            if current:
                rebuilt.append(current)
            current = piece
    rebuilt.append(current)
    expected = [
        [tokenizer.start_token_id] + list(ids) + [tokenizer.end_token_id]
        for ids in tokenizer(DOCUMENTS)
    ]
    assert rebuilt == expected
    # The long document did not fit in a row, so it was cut.
    assert len(pieces) > len(DOCUMENTS)


def test_pack_bad_input():
    preprocessor = tiny_causal_lm("hawk").preprocessor
    with pytest.raises(ValueError, match="`documents` is empty"):
        preprocessor.pack([])
    with pytest.raises(ValueError, match="sequence_length.*positive"):
        preprocessor.pack(["a"], sequence_length=0)


def test_packed_loss_is_the_loss_of_each_document_alone():
    lm = tiny_causal_lm("griffin")
    lm.compile(sampler="greedy")
    x, y, sample_weight = lm.preprocessor.pack(DOCUMENTS, sequence_length=24)
    packed, *_ = lm.evaluate(
        x, y, sample_weight=sample_weight, batch_size=len(y), verbose=0
    )
    # The same tokens, one document per row (right-padded), no packing.
    segments = [
        segment for row in range(len(y)) for segment in split_segments(x, y, row)
    ]
    width = max(len(inputs) for inputs, _ in segments)
    token_ids = np.zeros((len(segments), width), "int32")
    padding_mask = np.zeros((len(segments), width), "int32")
    for i, (inputs, _) in enumerate(segments):
        token_ids[i, : len(inputs)] = inputs
        padding_mask[i, : len(inputs)] = 1
    logits = to_numpy(lm({"token_ids": token_ids, "padding_mask": padding_mask}))
    total, count = 0.0, 0
    for row_logits, (_, labels) in zip(logits.astype("float64"), segments, strict=True):
        row_logits = row_logits[: len(labels)]
        shifted = row_logits - row_logits.max(-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        total += -log_p[np.arange(len(labels)), labels].sum()
        count += len(labels)
    # `compile`'s default loss averages over real (weighted) tokens only.
    np.testing.assert_allclose(packed, total / count, rtol=1e-5)


def test_fit_on_packed_rows_lowers_the_loss():
    lm = tiny_causal_lm("griffin")
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    x, y, sample_weight = lm.preprocessor.pack(DOCUMENTS * 2, sequence_length=24)
    history = lm.fit(
        x, y, sample_weight=sample_weight, batch_size=2, epochs=3, verbose=0
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_lora_fit_with_bfloat16_weights_on_raw_strings():
    lm = tiny_causal_lm("griffin", sequence_length=16, dtype="bfloat16")
    lm.backbone.enable_lora(4)
    lm.compile(optimizer=keras.optimizers.Adam(2e-2), sampler="greedy")
    history = lm.fit(DOCUMENTS * 2, batch_size=4, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    # Base weights stay bfloat16; Keras keeps LoRA factors in float32 so
    # small updates do not underflow.
    dtypes = {v.path: keras.backend.standardize_dtype(v.dtype) for v in lm.weights}
    assert {d for p, d in dtypes.items() if "lora_kernel" not in p} == {"bfloat16"}
    assert {d for p, d in dtypes.items() if "lora_kernel" in p} == {"float32"}
    assert lm.generate("The quick", max_length=8)


def test_fit_on_raw_strings_does_not_warn_about_a_default_shuffle():
    lm = tiny_causal_lm("griffin", sequence_length=16)
    lm.compile(optimizer="adam", sampler="greedy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm.fit(DOCUMENTS, batch_size=2, epochs=1, verbose=0)
    assert not [w for w in caught if "shuffle" in str(w.message)]
    # Asked for by the user, the setting Keras cannot honour is still named.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm.fit(DOCUMENTS, batch_size=2, epochs=1, verbose=0, shuffle=True)
    assert [w for w in caught if "shuffle" in str(w.message)]


def one_sgd_step(lm, x, y, sample_weight):
    """The loss and each trainable weight's update of one SGD step."""
    lm.compile(optimizer=keras.optimizers.SGD(0.5), sampler="greedy")
    before = {v.path: to_numpy(v) for v in lm.trainable_weights}
    loss = lm.train_on_batch(x, y, sample_weight=sample_weight)
    return loss, {v.path: to_numpy(v) - before[v.path] for v in lm.trainable_weights}


@pytest.mark.parametrize("use_lora", [False, True])
def test_remat_gives_the_same_training_step(use_lora):
    models = [tiny_causal_lm("griffin", remat=remat) for remat in (False, True)]
    assert [block.remat for block in models[1].backbone.residual_blocks] == [True] * 3
    x, y, sample_weight = models[0].preprocessor.pack(DOCUMENTS, sequence_length=24)
    results = []
    for lm in models:
        if use_lora:
            lm.backbone.enable_lora(2)
            # The same factors in both models; B = 0 would hide A's gradient.
            rng = np.random.default_rng(0)
            for layer in lm.backbone._flatten_layers():
                if getattr(layer, "lora_enabled", False):
                    for factor in (layer.lora_kernel_a, layer.lora_kernel_b):
                        factor.assign(rng.normal(scale=0.1, size=factor.shape))
        results.append(one_sgd_step(lm, x, y, sample_weight))
    (loss, updates), (remat_loss, remat_updates) = results
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    assert sorted(remat_updates) == sorted(updates)
    # Each update relative to its own size. TF re-runs the block inside
    # `recompute_grad`'s gradient function, which it fuses and orders
    # differently: 3.1e-5 measured there (float32 round-off through three
    # blocks and the softmax), so the bound is 1e-4; a missing or doubled
    # gradient term would be O(1).
    errors = {p: relative_error(remat_updates[p], u) for p, u in updates.items()}
    assert max(errors.values()) < 1e-4, errors


def test_from_preset_forwards_remat(tmp_path):
    lm = tiny_causal_lm("hawk")
    lm.save_to_preset(str(tmp_path))
    loaded = RecurrentGemmaCausalLM.from_preset(str(tmp_path), remat=True)
    assert loaded.backbone.remat
    assert all(block.remat for block in loaded.backbone.residual_blocks)
    assert not RecurrentGemmaCausalLM.from_preset(str(tmp_path)).backbone.remat


@pytest.mark.skipif(keras.config.backend() != "jax", reason="XLA's plan: JAX")
def test_jax_remat_keeps_one_blocks_activations():
    # XLA's CPU compiler drops the barrier `jax.checkpoint` relies on and
    # then recomputes early, so `keras.remat` held as much as no remat; with
    # `ops.remat` the recomputation waits for the block's gradient. Eight
    # recurrent blocks: their activations are most of the step's scratch.
    import jax

    def scratch_bytes(remat):
        lm = tiny_causal_lm("hawk", remat=remat, block_types=["recurrent"] * 8)
        backbone = lm.backbone
        ids = np.ones((1, 512), "int32")
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

        def loss(trainable, frozen):
            hidden, _ = backbone.stateless_call(trainable, frozen, inputs)
            return jax.numpy.sum(jax.numpy.square(hidden))

        values = [
            [v.value for v in backbone.trainable_variables],
            [v.value for v in backbone.non_trainable_variables],
        ]
        compiled = jax.jit(jax.grad(loss)).lower(*values).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # Measured: 0.16 of it, against 0.95 with `keras.remat`.
    assert scratch_bytes(remat=True) < 0.5 * scratch_bytes(remat=False)


def test_training_on_a_cpu_tells_glibc_what_the_backend_needs(monkeypatch):
    from keras_recurrentgemma.utils import host_malloc

    limits, trims = [], []
    monkeypatch.setattr(host_malloc, "limit_heap_retention", lambda: limits.append(1))
    monkeypatch.setattr(host_malloc, "trim_after_compiles", lambda: trims.append(1))
    lm = tiny_causal_lm("griffin", sequence_length=8)
    lm.compile(optimizer="sgd")
    ids = np.arange(1, 10, dtype="int32")[None]
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    lm.train_on_batch(x, ids[:, 1:])
    lm.predict(x, verbose=0)
    # The tests run on a CPU; only torch uses glibc's heap for its tensors,
    # once per training step.
    assert limits == ([1] if keras.config.backend() == "torch" else [])
    # Once per step built (train, then predict), and only JAX compiles.
    assert trims == ([1, 1] if keras.config.backend() == "jax" else [])


def test_heap_retention_limit_leaves_a_users_setting(monkeypatch):
    import sys

    from keras_recurrentgemma.utils import host_malloc

    monkeypatch.setattr(host_malloc, "_done", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert host_malloc.limit_heap_retention() is False
    # Once per process: a second call does nothing, set or not.
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert host_malloc.limit_heap_retention() is False
    monkeypatch.setattr(host_malloc, "_done", False)
    # glibc's mallopt returns 1 on success; this project's CI runs on Linux.
    assert host_malloc.limit_heap_retention() is sys.platform.startswith("linux")


@pytest.mark.skipif(keras.config.backend() != "jax", reason="XLA compiles on JAX")
def test_heap_trim_follows_long_compiles_only(monkeypatch):
    import jax

    from keras_recurrentgemma.utils import host_malloc

    trims = []

    class FakeLibc:
        def malloc_trim(self, pad):
            trims.append(pad)

    monkeypatch.setattr(host_malloc, "_glibc", FakeLibc)
    monkeypatch.setattr(host_malloc, "_trimming", False)
    monkeypatch.setattr(host_malloc, "_listener", None)
    assert host_malloc.trim_after_compiles() is True
    try:
        assert host_malloc.trim_after_compiles() is False  # once per process
        # Every compile is "long" at 0 s: this checks JAX still records the
        # event the listener waits for under the name it expects.
        monkeypatch.setattr(host_malloc, "TRIM_AFTER_SECONDS", 0.0)
        jax.jit(lambda v: v * 3 + 1)(np.ones(5, "float32")).block_until_ready()
        assert trims == [0]
        monkeypatch.setattr(host_malloc, "TRIM_AFTER_SECONDS", 1e9)
        jax.jit(lambda v: v * 5 - 2)(np.ones(5, "float32")).block_until_ready()
        assert trims == [0]
    finally:
        jax.monitoring.unregister_event_duration_listener(host_malloc._listener)


def test_heap_trim_needs_glibc(monkeypatch):
    from keras_recurrentgemma.utils import host_malloc

    monkeypatch.setattr(host_malloc, "_glibc", lambda: None)
    monkeypatch.setattr(host_malloc, "_trimming", False)
    monkeypatch.setattr(host_malloc, "_listener", None)
    assert host_malloc.trim_after_compiles() is False
    assert host_malloc._listener is None
