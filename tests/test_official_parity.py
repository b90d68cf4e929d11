"""Parity with the official DeepMind RecurrentGemma models, and the converter.

The official JAX (Flax) and PyTorch `Griffin` models and our backbone run on
the same random weights, converted with `backbone_from_official`, and their
logits are compared on plain, packed and left-padded batches whose length is
about three attention windows. Every leaf of the official tree is random
(norm scales and biases included), so a tensor mapped to the wrong place
cannot hide behind an all-zeros initialisation.

Run once per backend: `KERAS_BACKEND=jax|tensorflow|torch pytest ...`.
"""

import jax
import jax.numpy as jnp
import keras
import ml_dtypes
import numpy as np
import pytest
import recurrentgemma.jax
import recurrentgemma.torch
import torch
from recurrentgemma import common as official_common
from recurrentgemma.conversion import flax_params_to_pytorch_state_dict

from keras_recurrentgemma.convert.official import backbone_from_official
from tests.conftest import TINY_CONFIGS
from tests.tolerances import PARITY
from tests.tolerances import relative_error

CONFIG_NAMES = sorted(TINY_CONFIGS)
CASES = ("plain", "packed_even", "packed_uneven", "left_padded")
# Both block types and lru_width != hidden_dim. Only one config: on JAX each
# new model costs seconds of XLA compiles (variable initialisers included).
BF16_CONFIG_NAMES = ("griffin",)
BATCH = 2

_BLOCK_TYPE = {
    "recurrent": official_common.TemporalBlockType.RECURRENT,
    "attention": official_common.TemporalBlockType.ATTENTION,
}
# Official `GriffinConfig` values for what our converter cannot infer; our
# backbone's defaults are the same.
_SOFT_CAP = 30.0


def official_config(name):
    c = TINY_CONFIGS[name]
    return official_common.GriffinConfig(
        vocab_size=c["vocabulary_size"],
        width=c["hidden_dim"],
        mlp_expanded_width=c["intermediate_dim"],
        num_heads=c["num_heads"],
        block_types=tuple(_BLOCK_TYPE[b] for b in c["block_types"]),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=c["attention_window_size"],
        logits_soft_cap=_SOFT_CAP,
        lru_width=c.get("lru_width"),
    )


def seq_len(name):
    return 3 * TINY_CONFIGS[name]["attention_window_size"]


def random_official_params(config, seed):
    """The official parameter tree, every leaf drawn at random.

    The structure and shapes come from `jax.eval_shape` of the official init
    (cheap). Values are `N(0, 0.2²)`, which keeps activations O(1) at these
    widths; `a_param` is drawn so that `a = exp(-8 r softplus(a_param))`
    spans short and long memories, as the official ring init does.
    """
    model = recurrentgemma.jax.Griffin(config, gradient_checkpointing=False)
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "a_param":
            value = rng.uniform(-7.0, -1.0, leaf.shape)
        else:
            value = rng.normal(0.0, 0.2, leaf.shape)
        return value.astype(np.float32)

    params = jax.tree_util.tree_map_with_path(fill, shapes["params"])
    return jax.tree_util.tree_map(np.asarray, params)


def make_case(name, case, seed=0):
    """Tokens, official segment_pos, our backbone inputs, real-token mask."""
    t = seq_len(name)
    window = TINY_CONFIGS[name]["attention_window_size"]
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY_CONFIGS[name]["vocabulary_size"], (BATCH, t))
    tokens = tokens.astype(np.int32)
    arange = np.arange(t)
    valid = np.ones((BATCH, t), bool)
    ours = {"token_ids": tokens, "padding_mask": np.ones((BATCH, t), np.int32)}

    def packed(*lengths):
        assert sum(lengths) == t
        return np.concatenate([np.arange(n) for n in lengths])

    if case == "plain":
        segment_pos = np.stack([arange, arange])
    elif case == "packed_even":
        segment_pos = np.stack([packed(t // 2, t - t // 2)] * 2)
    elif case == "packed_uneven":
        # Row 1 has a one-token document and one longer than the window.
        segment_pos = np.stack(
            [packed(3, t - 3), packed(window + 2, 1, t - window - 3)]
        )
    elif case == "left_padded":
        pads = np.array([window + 1, 2])
        segment_pos = np.maximum(arange[None] - pads[:, None], -1)
        valid = segment_pos >= 0
        ours["padding_mask"] = valid.astype(np.int32)
    else:
        raise AssertionError(case)
    segment_pos = segment_pos.astype(np.int32)
    if case.startswith("packed"):
        ours["segment_pos"] = segment_pos
    return tokens, segment_pos, ours, valid


def _logits(backbone, inputs):
    hidden = backbone(inputs)
    return keras.ops.cast(backbone.token_embedding(hidden, reverse=True), "float32")


def our_logits(backbone, inputs):
    """`backbone(inputs)`, then the tied, soft-capped output projection."""
    return keras.ops.convert_to_numpy(_logits(backbone, inputs))


class Reference:
    """One tiny config: random weights, the official models, our backbones."""

    def __init__(self, name):
        self.name = name
        self.config = official_config(name)
        self.params = random_official_params(self.config, seed=CONFIG_NAMES.index(name))
        self._jax = {}
        self._ours = {}
        self._ours_jitted = {}
        self._torch = None

    def official_jax(self, dtype, tokens, segment_pos):
        if dtype not in self._jax:
            jdtype = jnp.dtype(dtype)
            model = recurrentgemma.jax.Griffin(
                self.config,
                gradient_checkpointing=False,
                dtype=jdtype,
                param_dtype=jdtype,
            )
            params = jax.tree_util.tree_map(
                lambda x: jnp.asarray(x, jdtype), self.params
            )

            @jax.jit
            def apply(tokens, segment_pos):
                logits, _ = model.apply(
                    {"params": params}, tokens, segment_pos, return_cache=False
                )
                return logits

            self._jax[dtype] = apply
        logits = self._jax[dtype](tokens, segment_pos)
        return np.asarray(logits.astype(jnp.float32))

    def official_torch(self, tokens, segment_pos):
        if self._torch is None:
            model = recurrentgemma.torch.Griffin(
                self.config, gradient_checkpointing=False, dtype=torch.float32
            )
            model.load_state_dict(flax_params_to_pytorch_state_dict(self.params))
            self._torch = model.eval()
        with torch.no_grad():
            logits, _ = self._torch(
                torch.from_numpy(tokens).long(),
                torch.from_numpy(segment_pos).long(),
                return_cache=False,
            )
        return logits.numpy()

    def ours(self, dtype):
        if dtype not in self._ours:
            params = self.params
            if dtype == "bfloat16":
                params = jax.tree_util.tree_map(
                    lambda x: x.astype(ml_dtypes.bfloat16), params
                )
            self._ours[dtype] = backbone_from_official(
                params,
                dtype=dtype,
                attention_window_size=self.config.attention_window_size,
            )
        return self._ours[dtype]

    def ours_logits(self, dtype, inputs):
        if keras.config.backend() != "jax":
            return our_logits(self.ours(dtype), inputs)
        # Eager JAX compiles every op for every new shape, which costs seconds
        # per model here; one jit per model computes the same thing faster.
        if dtype not in self._ours_jitted:
            backbone = self.ours(dtype)
            self._ours_jitted[dtype] = jax.jit(lambda x: _logits(backbone, x))
        return np.asarray(self._ours_jitted[dtype](inputs))


@pytest.fixture(scope="module")
def references():
    return {name: Reference(name) for name in CONFIG_NAMES}


def _compare_fp32(ours, official, valid):
    error = relative_error(ours[valid], official[valid])
    print(f"relative error {error:.2e}")
    assert np.all(np.isfinite(ours[valid]))
    assert error <= PARITY["float32"]["relative"], error


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_matches_official_jax_float32(references, name, case):
    ref = references[name]
    tokens, segment_pos, inputs, valid = make_case(name, case)
    official = ref.official_jax("float32", tokens, segment_pos)
    ours = ref.ours_logits("float32", inputs)
    assert ours.shape == official.shape == (BATCH, seq_len(name), ref.config.vocab_size)
    _compare_fp32(ours, official, valid)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_matches_official_torch_float32(references, name, case):
    ref = references[name]
    tokens, segment_pos, inputs, valid = make_case(name, case)
    official = ref.official_torch(tokens, segment_pos)
    ours = ref.ours_logits("float32", inputs)
    _compare_fp32(ours, official, valid)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", BF16_CONFIG_NAMES)
def test_matches_official_jax_bfloat16(references, name, case):
    ref = references[name]
    tokens, segment_pos, inputs, valid = make_case(name, case)
    official = ref.official_jax("bfloat16", tokens, segment_pos)
    assert ref.ours("bfloat16").token_embedding.embeddings.dtype == "bfloat16"
    ours = ref.ours_logits("bfloat16", inputs)
    diff = np.abs(ours[valid] - official[valid])
    tol = PARITY["bfloat16"]
    allowed = tol["atol"] + tol["rtol"] * np.abs(official[valid])
    print(
        f"max abs error {diff.max():.2e}, "
        f"relative {relative_error(ours[valid], official[valid]):.2e}, "
        f"fraction of tolerance used {np.max(diff / allowed):.2f}"
    )
    np.testing.assert_allclose(ours[valid], official[valid], **PARITY["bfloat16"])


# --- Configuration inference ---------------------------------------------------


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_infers_config(references, name):
    ref = references[name]
    expected = dict(TINY_CONFIGS[name])
    expected.setdefault("lru_width", expected["hidden_dim"])
    expected.update(
        attention_window_size=2048,
        conv1d_temporal_width=4,
        logits_soft_cap=30.0,
        embeddings_scale_by_sqrt_dim=True,
    )
    # Wrapped, with JAX leaves, as Orbax restores a training state.
    params = {"params": jax.tree_util.tree_map(jnp.asarray, ref.params)}
    backbone = backbone_from_official(params)
    config = backbone.get_config()
    assert {k: config[k] for k in expected} == expected


def test_overrides_replace_inferred_and_default_values(references):
    ref = references["hawk"]
    backbone = backbone_from_official(
        ref.params,
        attention_window_size=7,
        logits_soft_cap=None,
        embeddings_scale_by_sqrt_dim=False,
        block_types=["recurrent", "recurrent"],
    )
    assert backbone.attention_window_size == 7
    assert backbone.logits_soft_cap is None
    assert backbone.embeddings_scale_by_sqrt_dim is False
    # An override that contradicts the tensors is caught by the shape check.
    with pytest.raises(ValueError, match="embedder/input_embedding"):
        backbone_from_official(ref.params, hidden_dim=16)


def test_unknown_override_lists_valid_names(references):
    with pytest.raises(ValueError, match=r"\['window'\].*attention_window_size"):
        backbone_from_official(references["hawk"].params, window=8)


def test_loaded_weights_are_the_checkpoint_tensors(references):
    ref = references["griffin"]
    backbone = ref.ours("float32")
    weights = {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights}
    block0 = ref.params["blocks.0"]
    # Official kernels are `[in, out]`, ours `[out, in]`.
    np.testing.assert_array_equal(
        weights["residual_block_0/mlp_block/ffw_gate/kernel"],
        block0["mlp_block"]["ffw_up"]["w"][0].T,
    )
    np.testing.assert_array_equal(
        weights["residual_block_0/recurrent_block/linear_x/kernel"],
        block0["recurrent_block"]["linear_x"]["kernel"].T,
    )
    np.testing.assert_array_equal(
        weights["residual_block_0/mlp_block/ffw_up/bias"],
        block0["mlp_block"]["ffw_up"]["b"][1, 0, 0],
    )
    np.testing.assert_array_equal(
        weights["token_embedding/embeddings"],
        ref.params["embedder"]["input_embedding"],
    )


# --- Bad input -----------------------------------------------------------------


def _copy(tree):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def test_missing_tensor_is_named(references):
    params = _copy(references["griffin"].params)
    del params["blocks.1"]["recurrent_block"]["rg_lru"]["a_gate"]["b"]
    with pytest.raises(ValueError, match="blocks.1/recurrent_block/rg_lru/a_gate/b"):
        backbone_from_official(params)


def test_misshaped_tensor_is_named(references):
    params = _copy(references["griffin"].params)
    conv = params["blocks.0"]["recurrent_block"]["conv_1d"]
    conv["b"] = np.zeros(conv["b"].shape[0] + 1, np.float32)
    with pytest.raises(ValueError, match="blocks.0/recurrent_block/conv_1d/b"):
        backbone_from_official(params)


def test_misshaped_stacked_mlp_is_named(references):
    params = _copy(references["griffin"].params)
    mlp = params["blocks.2"]["mlp_block"]
    mlp["ffw_up"]["w"] = mlp["ffw_up"]["w"][:1]
    with pytest.raises(ValueError, match="blocks.2/mlp_block/ffw_up/w"):
        backbone_from_official(params)


def test_unexpected_tensor_is_named(references):
    params = _copy(references["griffin"].params)
    params["blocks.2"]["attention_block"]["proj_q"]["bias"] = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match="blocks.2/attention_block/proj_q/bias"):
        backbone_from_official(params)


def test_disagreeing_head_counts_raise(references):
    params = _copy(references["griffin"].params)
    for gate in ("input_gate", "a_gate"):
        for i in (0, 1):
            rg_lru = params[f"blocks.{i}"]["recurrent_block"]["rg_lru"]
            rg_lru[gate]["w"] = np.zeros((2, 24, 24), np.float32)
            rg_lru[gate]["b"] = np.zeros((2, 24), np.float32)
    with pytest.raises(ValueError, match="must agree"):
        backbone_from_official(params)


@pytest.mark.parametrize(
    "bad",
    [
        {"layers": {"w": np.zeros(3)}},
        {"params": {"transformer": {}}},
        [np.zeros(3)],
    ],
)
def test_not_a_griffin_tree(bad):
    with pytest.raises(ValueError, match="Expected an official RecurrentGemma"):
        backbone_from_official(bad)


def test_gap_in_block_numbering(references):
    params = _copy(references["griffin"].params)
    params["blocks.5"] = params.pop("blocks.1")
    with pytest.raises(ValueError, match="blocks.1"):
        backbone_from_official(params)
