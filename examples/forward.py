"""Forward pass of a small random RecurrentGemma backbone on the current backend.

    KERAS_BACKEND=jax python examples/forward.py     # or tensorflow, torch

Builds a Griffin backbone (two recurrent blocks, then one local-attention
block) with random weights, runs a batch whose second row is left-padded,
and prints the logits' shape and each row's next-token argmax. The padded
row must give the same logits as the same prompt run alone.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_recurrentgemma import RecurrentGemmaBackbone  # noqa: E402


def main():
    keras.utils.set_random_seed(0)
    backbone = RecurrentGemmaBackbone(
        vocabulary_size=256,
        hidden_dim=128,
        intermediate_dim=384,
        num_heads=4,
        block_types=["recurrent", "recurrent", "attention"],
        attention_window_size=16,
    )
    print(f"backend: {keras.config.backend()}, parameters: {backbone.count_params():,}")

    bos, pad = 2, 0
    long_prompt = [bos, 17, 42, 7, 99, 3, 64, 11]
    short_prompt = [bos, 5, 23, 81, 9]
    width = len(long_prompt)
    padding = width - len(short_prompt)
    token_ids = np.array([long_prompt, [pad] * padding + short_prompt], "int32")
    padding_mask = (np.arange(width)[None] >= [[0], [padding]]).astype("int32")

    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    logits = keras.ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))
    print(f"logits shape: {logits.shape}  (batch, seq, vocabulary)")
    print(f"next-token argmax per row: {logits[:, -1].argmax(-1).tolist()}")

    alone = backbone(
        {
            "token_ids": np.array([short_prompt], "int32"),
            "padding_mask": np.ones((1, len(short_prompt)), "int32"),
        }
    )
    alone = keras.ops.convert_to_numpy(backbone.token_embedding(alone, reverse=True))
    gap = np.abs(logits[1, padding:] - alone[0]).max()
    print(f"left-padded row vs unpadded prompt, max |logit difference|: {gap:.2e}")


if __name__ == "__main__":
    main()
