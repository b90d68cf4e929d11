"""The one way our layers make a `keras.layers.Dense`."""

import keras


def fan_in_dense(units, name, dtype, use_bias=True, scale=1.0):
    """Dense layer with the official fan-in normal initialisation.

    `scale` shrinks the variance of output projections (`2 / num_layers` in
    Griffin), which matters only when training from scratch.
    """
    return keras.layers.Dense(
        units,
        use_bias=use_bias,
        kernel_initializer=keras.initializers.VarianceScaling(
            scale, mode="fan_in", distribution="normal"
        ),
        dtype=dtype,
        name=name,
    )
