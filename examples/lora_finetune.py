"""LoRA fine-tuning of a RecurrentGemma preset on raw text, then save and reload.

    KERAS_BACKEND=jax python examples/lora_finetune.py
    python examples/lora_finetune.py --data my_notes.txt --epochs 10 --plot loss.png
    python examples/lora_finetune.py --preset recurrentgemma_2b_en --sequence-length 256

Steps:
1. load the preset (default: the shipped `griffin_tiny_pydocs_en`);
2. `backbone.enable_lora(rank)`: the backbone is frozen and small trainable
   factors are added to the attention query/value projections and to the
   recurrent blocks' input projections;
3. compile with AdamW and generate from `--prompt` (LoRA starts as a no-op,
   so this is the preset's own text);
4. `fit` on a list of strings: the attached preprocessor tokenizes, adds
   `<bos>`/`<eos>` and pads them to `--sequence-length`; the loss is printed
   after each epoch; then generate from the same prompt again;
5. `backbone.save_lora_weights(".../model.lora.h5")` writes only the
   factors (kilobytes, not the whole model); a fresh model from the same
   preset reloads them with `load_lora_weights` and gives the same logits;
6. `save_to_preset` writes a standalone preset with the factors merged into
   the kernels, which `from_preset` loads like any other.

`--data FILE` trains on FILE's paragraphs (separated by blank lines) instead
of the built-in sentences. The model is small and the data tiny, so the point
is the recipe, not the quality of the result.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_recurrentgemma import RecurrentGemmaCausalLM  # noqa: E402

# Python-docs-style sentences about this library's own API: new facts for a
# model trained on the Python documentation, in a voice it already knows.
SENTENCES = [
    "The enable_lora() method freezes the backbone and adds small trainable "
    "matrices to the query and value projections.",
    "The save_lora_weights() method writes only the low-rank matrices to a file "
    "whose name ends in .lora.h5.",
    "The load_lora_weights() method reads those matrices back into a model built "
    "from the same preset.",
    "The save_to_preset() method merges the low-rank matrices into the kernels "
    "and writes a new preset directory.",
    "The generate() method continues each prompt until the end token or until "
    "max_length tokens.",
    "The compile() method sets the optimizer and the loss used by fit() and the "
    "sampler used by generate().",
    "The from_preset() class method builds the model and its tokenizer from a "
    "preset name or directory.",
    "The fit() method trains the model on a list of strings for a number of epochs.",
    "The chat() method formats a conversation into turns and returns the reply "
    "of the model.",
    "The RG-LRU layer keeps a recurrent state whose size does not grow with the "
    "length of the input.",
    "The local attention layer looks only at the most recent tokens inside a "
    "fixed window.",
    "The score() method returns the logits or the loss of every token in a "
    "batch of sequences.",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="griffin_tiny_pydocs_en")
    parser.add_argument(
        "--data", help="text file; its blank-line-separated paragraphs are the data"
    )
    parser.add_argument("--prompt", default="The enable_lora() method")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=64,
        help="tokens per training example, longer ones are cut (default: %(default)s)",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--max-length", type=int, default=48, help="prompt plus new tokens"
    )
    parser.add_argument(
        "--output-dir",
        default="lora_output",
        help="where the LoRA weights and the merged preset go (default: %(default)s)",
    )
    parser.add_argument("--plot", help="save the loss curve to this PNG file")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def read_paragraphs(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise ValueError(f"{path} has no text to train on.")
    return paragraphs


def load(preset, sequence_length):
    causal_lm = RecurrentGemmaCausalLM.from_preset(preset)
    # Training examples are padded or cut to this length; the preset's own is
    # longer than these sentences need, and every padding token costs compute.
    causal_lm.preprocessor.sequence_length = sequence_length
    return causal_lm


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def logits(causal_lm, batch):
    return keras.ops.convert_to_numpy(causal_lm(batch))


def save_plot(losses, path):
    import matplotlib

    # A file, not a window: this also runs on machines without a display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss per token")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    """Fine-tunes, saves and reloads; returns a dict of what it measured."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    texts = read_paragraphs(args.data) if args.data else SENTENCES
    os.makedirs(args.output_dir, exist_ok=True)

    causal_lm = load(args.preset, args.sequence_length)
    causal_lm.backbone.enable_lora(args.rank)
    total = causal_lm.count_params()
    trainable = trainable_count(causal_lm)
    print(
        f"LoRA rank {args.rank}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)"
    )

    optimizer = keras.optimizers.AdamW(
        learning_rate=args.learning_rate, weight_decay=0.01
    )
    # Padding has sample weight 0, but Keras's default average still counts
    # it: averaging over the weights gives the loss per real token, which
    # does not change with --sequence-length.
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    causal_lm.compile(
        optimizer=optimizer,
        loss=loss,
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    # LoRA's second factor starts at zero, so this is still the preset's own
    # output. Generating after `compile` rather than before `enable_lora`
    # compiles the sampling loop once: `fit` keeps it, and it reads the
    # weights as they are when called.
    before = causal_lm.generate(args.prompt, max_length=args.max_length)
    print(f"before: {before}")

    start = time.perf_counter()
    history = causal_lm.fit(
        texts, batch_size=args.batch_size, epochs=args.epochs, verbose=2
    )
    losses = [float(x) for x in history.history["loss"]]
    print(
        f"{len(texts)} texts, {args.epochs} epochs in "
        f"{time.perf_counter() - start:.1f}s; loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )
    if args.plot:
        save_plot(losses, args.plot)

    after = causal_lm.generate(args.prompt, max_length=args.max_length)
    print(f"after:  {after}")

    lora_path = os.path.join(args.output_dir, "model.lora.h5")
    causal_lm.backbone.save_lora_weights(lora_path)
    print(f"saved {lora_path} ({os.path.getsize(lora_path) / 1024:.0f} KiB)")

    batch = causal_lm.preprocessor(texts[: args.batch_size])[0]
    expected = logits(causal_lm, batch)
    reloaded = load(args.preset, args.sequence_length)
    reloaded.backbone.load_lora_weights(lora_path)
    reloaded_logits = logits(reloaded, batch)
    gap = np.abs(reloaded_logits - expected).max()
    print(f"fresh model + {lora_path}: max |logit difference| {gap:.2e}")

    preset_dir = os.path.join(args.output_dir, "merged_preset")
    causal_lm.save_to_preset(preset_dir)
    merged = RecurrentGemmaCausalLM.from_preset(preset_dir)
    merged_logits = logits(merged, batch)
    gap = np.abs(merged_logits - expected).max()
    print(f"merged preset {preset_dir}: max |logit difference| {gap:.2e}")

    return {
        "loss": losses,
        "trainable_params": trainable,
        "total_params": total,
        "before": before,
        "after": after,
        "lora_path": lora_path,
        "preset_dir": preset_dir,
        "logits": expected,
        "reloaded_logits": reloaded_logits,
        "merged_logits": merged_logits,
    }


if __name__ == "__main__":
    main()
