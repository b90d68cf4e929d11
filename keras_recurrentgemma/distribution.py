"""Weight layouts for `keras.distribution.ModelParallel` (JAX)."""

import keras

# A path may sit under an enclosing name scope, e.g. a user's wrapper model.
_SCOPE = r"(?:.*/)?"
_BLOCK = _SCOPE + r"residual_block_\d+/"


def get_layout_map(
    device_mesh,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
):
    """A `keras.distribution.LayoutMap` that shards RecurrentGemma's weights.

    Tensor parallelism in the Megatron pattern over the model axis: the first
    matrix of each branch is split by output columns and the last by input
    rows, so everything between them stays on its own device and each branch
    ends in a single all-reduce. The other dimension of those matrices is
    split over the data axis (fully sharded data parallelism, as KerasHub's
    Gemma layout does), so the weights' memory is spread over every device;
    on a `(1, n)` mesh that axis has size 1 and the layout is plain Megatron.

    Layouts name the mesh axes `model` (`model_parallel_dim_name`) and `data`
    (`data_parallel_dim_name`); paths are under `residual_block_<i>/`:

        weight                          shape                    layout
        token_embedding/embeddings      [vocab, hidden]          (model, data)
        attention_block/
          proj_q/kernel                 [heads·head_dim, hidden] (model, data)
          proj_k/kernel, proj_v/kernel  [head_dim, hidden]       replicated
          proj_final/kernel             [hidden, heads·head_dim] (data, model)
        recurrent_block/
          linear_x|linear_y/kernel      [lru, hidden]            (model, data)
          linear_x|linear_y/bias        [lru]                    (model,)
          conv_1d/w                     [conv_width, lru]        (None, model)
          conv_1d/b, rg_lru/a_param     [lru]                    (model,)
          rg_lru/input_gate|a_gate/w    [heads, block, block]    replicated
          rg_lru/input_gate|a_gate/b    [heads, block]           replicated
          linear_out/kernel             [hidden, lru]            (data, model)
        mlp_block/
          ffw_gate|ffw_up/kernel        [intermediate, hidden]   (model, data)
          ffw_gate|ffw_up/bias          [intermediate]           (model,)
          ffw_down/kernel               [hidden, intermediate]   (data, model)
        norm scales, proj_final/bias,
          linear_out/bias, ffw_down/bias                         replicated

    Why:
    - The embedding is split over the vocabulary, so the tied output
      projection yields logits already split over the vocabulary, rather than
      partial sums of `[batch, seq, vocab]` that would need an all-reduce.
    - `proj_q` is split by columns, which are head-major, so each device holds
      whole query heads when `num_heads` is a multiple of the model axis size
      (otherwise XLA reshards the heads; results are the same). `proj_final`
      takes those heads back by rows.
    - Keys and values have a single head, shared by every query head
      (multi-query attention), so there is no head axis to split: a layout
      that splits key/value heads over the model axis fails on one head
      (keras-hub issue #1613). Every device needs the whole head for its
      query heads, and it is small, so it is replicated.
    - In the recurrent branch, `linear_x`/`linear_y` split the `lru` channels;
      the depthwise Conv1D, the RG-LRU and `a_param` act channel by channel,
      so their weights follow the same split and need no communication;
      `linear_out` joins the channels back by rows.
    - The RG-LRU gates are block diagonal, one `[block, block]` matrix per
      head. Splitting them by head would require `num_heads` to be a multiple
      of the model axis size, and the 2B has 10 heads, so it would fail on 4
      or 8 devices. They are under 1% of the parameters, so every device
      holds them all and applies the blocks of the channels it has.
    - Biases after a row split are added once, to the all-reduced sum, so
      they are replicated; biases after a column split follow the columns.

    Every sharded dimension must be a multiple of its mesh axis size (JAX
    refuses uneven shards): `vocabulary_size`, `intermediate_dim` and
    `lru_width` of the model axis, and `hidden_dim` of both axes. The released
    presets (vocab 256000, widths 2560 and 4096) satisfy this on meshes of up
    to 8 devices per axis.

    Args:
        device_mesh: `keras.distribution.DeviceMesh`. The devices to shard
            over; must have an axis named `model_parallel_dim_name` and, unless
            it is `None`, one named `data_parallel_dim_name`.
        model_parallel_dim_name: str. Mesh axis the weights are split over,
            Megatron style. Defaults to `"model"`.
        data_parallel_dim_name: str or `None`. Mesh axis the batch is split
            over; the large matrices' other dimension is split over it as
            well. `None` keeps the weights whole across data replicas.
            Defaults to `"batch"`.

    Returns:
        A `keras.distribution.LayoutMap` on `device_mesh`, keyed by regular
        expressions over variable paths. Weights it does not name are
        replicated by `ModelParallel`.

    Raises:
        TypeError: if `device_mesh` is not a `keras.distribution.DeviceMesh`.
        ValueError: if a named axis is not in `device_mesh.axis_names`, or
            both names are the same axis.

    Example:
    ```python
    devices = keras.distribution.list_devices()  # e.g. 8 accelerators.
    mesh = keras.distribution.DeviceMesh(
        shape=(2, 4), axis_names=("batch", "model"), devices=devices
    )
    layout_map = keras_recurrentgemma.RecurrentGemmaBackbone.get_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        causal_lm = keras_recurrentgemma.RecurrentGemmaCausalLM.from_preset(
            "recurrentgemma_2b_en"
        )
    for v in causal_lm.backbone.get_layer("residual_block_0").weights:
        print(v.path, v.shape, v.value.sharding.spec)
    ```
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "`device_mesh` must be a `keras.distribution.DeviceMesh`; got "
            f"{type(device_mesh).__name__}."
        )
    axis_names = list(device_mesh.axis_names)
    named = [("model_parallel_dim_name", model_parallel_dim_name)]
    if data_parallel_dim_name is not None:
        named.append(("data_parallel_dim_name", data_parallel_dim_name))
    for argument, axis in named:
        if axis not in axis_names:
            raise ValueError(
                f"`{argument}={axis!r}` is not an axis of `device_mesh`, "
                f"whose axes are {axis_names}."
            )
    if model_parallel_dim_name == data_parallel_dim_name:
        raise ValueError(
            "`model_parallel_dim_name` and `data_parallel_dim_name` must name "
            f"different mesh axes; both are {model_parallel_dim_name!r}. Pass "
            "`data_parallel_dim_name=None` to shard over one axis only."
        )

    model, data = model_parallel_dim_name, data_parallel_dim_name
    # Kernels are `[out, in]` (`layers.dense.Dense`): split by output columns,
    # their first axis is the model axis; split by input rows, the second.
    column = (model, data)
    row = (data, model)

    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[_SCOPE + "token_embedding/embeddings"] = (model, data)

    attention = _BLOCK + "attention_block/"
    layout_map[attention + "proj_q/kernel"] = column
    # Named explicitly, not left to the default, so that no later catch-all
    # key can split the single key/value head.
    layout_map[attention + "proj_(k|v)/kernel"] = (None, None)
    layout_map[attention + "proj_final/kernel"] = row

    recurrent = _BLOCK + "recurrent_block/"
    layout_map[recurrent + "linear_(x|y)/kernel"] = column
    layout_map[recurrent + "linear_(x|y)/bias"] = (model,)
    layout_map[recurrent + "conv_1d/w"] = (None, model)
    layout_map[recurrent + "conv_1d/b"] = (model,)
    layout_map[recurrent + "rg_lru/a_param"] = (model,)
    layout_map[recurrent + "linear_out/kernel"] = row

    mlp = _BLOCK + "mlp_block/"
    layout_map[mlp + "ffw_(gate|up)/kernel"] = column
    layout_map[mlp + "ffw_(gate|up)/bias"] = (model,)
    layout_map[mlp + "ffw_down/kernel"] = row
    return layout_map
