"""Runs an exported generation artifact with its runtime, numpy and sentencepiece.

Imports neither Keras, KerasHub, JAX nor torch (and the package's
`__init__` imports nothing heavy), so a server needs only the format's
runtime: `onnxruntime` for `"onnx"`, `tensorflow` for `"tf_saved_model"`,
`ai_edge_litert` (or TensorFlow's `tf.lite`) for `"litert"`.

```python
from keras_recurrentgemma.serving import load_exported

generator = load_exported("griffin_onnx")
generator.generate(["def add(a, b):"], max_new_tokens=32)
for pieces in generator.stream(["import os"], max_new_tokens=32):
    print(pieces[0], end="", flush=True)
```

Memory stays flat however many tokens are generated: the state is the
artifact's fixed-size tensors, replaced at every step.
"""

import json
import numbers
import os

import numpy as np

from keras_recurrentgemma.utils.lists import one_or_more

SAMPLERS = ("greedy", "top_k", "top_p")


def load_exported(path):
    """An `ExportedGenerator` for the artifact directory `path`."""
    return ExportedGenerator(path)


class ExportedGenerator:
    """Generates from an artifact written by `export_for_generation`.

    Args:
        path: str. The artifact directory (with `generation.json`).
    """

    def __init__(self, path):
        meta_path = os.path.join(path, "generation.json")
        if not os.path.isfile(meta_path):
            raise ValueError(
                f"{path!r} is not an exported generation artifact (no "
                "generation.json); write one with `export_for_generation`."
            )
        with open(meta_path) as f:
            self.metadata = json.load(f)
        import sentencepiece

        self.tokenizer = sentencepiece.SentencePieceProcessor(
            model_file=os.path.join(path, self.metadata["tokenizer"])
        )
        self._runtime = _RUNTIMES[self.metadata["format"]](path, self.metadata)

    # --- The state --------------------------------------------------------

    def initial_state(self, batch_size):
        """The empty state: one numpy array per `metadata["state"]` entry."""
        return [
            np.full((batch_size, *e["shape"][1:]), e["fill"], e["dtype"])
            for e in self.metadata["state"]
        ]

    def prefill(self, prompts, state=None):
        """Absorbs token id lists (one per row, any lengths) chunk by chunk.

        Returns:
            `(logits float32 [b, v], state)`; each row's logits are those of
            the token after its own last prompt token.
        """
        c = self.metadata["prefill_length"]
        b = len(prompts)
        longest = max(len(p) for p in prompts)
        steps = max(1, -(-longest // c))
        ids = np.zeros((b, steps * c), "int32")
        mask = np.zeros((b, steps * c), "int32")
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1
        state = self.initial_state(b) if state is None else state
        for start in range(0, steps * c, c):
            chunk = slice(start, start + c)
            logits, *state = self._runtime.run(
                "prefill", [ids[:, chunk], mask[:, chunk], *state]
            )
        return logits, state

    def decode_step(self, token_ids, state):
        """Feeds one token per row (`[b]` ints); returns `(logits, state)`."""
        tokens = np.asarray(token_ids, "int32").reshape(-1, 1)
        logits, *state = self._runtime.run("decode_step", [tokens, *state])
        return logits, state

    # --- Generation ---------------------------------------------------------

    def tokenize(self, prompts):
        """Token id lists for `prompts` (strs), with `<bos>` when the model adds it."""
        start = (
            [self.metadata["start_token_id"]]
            if self.metadata["add_start_token"]
            else []
        )
        return [start + self.tokenizer.encode(p) for p in prompts]

    def stream_ids(
        self,
        prompts,
        max_new_tokens,
        sampler="greedy",
        stop_token_ids="auto",
        k=5,
        p=0.1,
        temperature=1.0,
        seed=None,
    ):
        """Yields each step's new token per row, int64 `[b]`, -1 once a row stopped.

        Args:
            prompts: list of strs, or list of token id lists (used as given).
            max_new_tokens: int > 0.
            sampler: `"greedy"`, `"top_k"` (the `k` likeliest) or `"top_p"`
                (the smallest set holding probability `p`).
            stop_token_ids: `"auto"` (the artifact's: `<eos>`, and
                `<end_of_turn>` for instruction-tuned models), `None`, or ids.
                A stop token ends its row and is not yielded.
            k, p, temperature: sampler parameters (KerasHub's defaults).
            seed: optional int, for reproducible sampling.
        """
        rows = self._prompt_ids(prompts)
        _check_positive_int(max_new_tokens, "max_new_tokens")
        pick = _sampler(sampler, k, p, temperature, np.random.default_rng(seed))
        stops = self._stop_ids(stop_token_ids)
        logits, state = self.prefill(rows)
        done = np.zeros(len(rows), bool)
        for step in range(max_new_tokens):
            token = pick(logits)
            done |= np.isin(token, stops)
            out = np.where(done, -1, token)
            yield out
            if done.all() or step == max_new_tokens - 1:
                return
            logits, state = self.decode_step(np.where(done, 0, token), state)

    def generate_ids(self, prompts, max_new_tokens, **kwargs):
        """New token id lists, one per prompt; see `stream_ids` for arguments."""
        out = [[] for _ in prompts]
        for tokens in self.stream_ids(prompts, max_new_tokens, **kwargs):
            for row, token in enumerate(tokens):
                if token >= 0:
                    out[row].append(int(token))
        return out

    def stream(self, prompts, max_new_tokens, **kwargs):
        """Yields each step's new text per row (list of strs; "" if none).

        Text is released once it decodes to whole characters, so a
        character split over byte tokens comes out in one piece.
        """
        decoders = [_IncrementalDecoder(self.tokenizer) for _ in prompts]
        for tokens in self.stream_ids(prompts, max_new_tokens, **kwargs):
            yield [
                d.push(int(t)) if t >= 0 else ""
                for d, t in zip(decoders, tokens, strict=True)
            ]

    def generate(self, prompts, max_new_tokens, **kwargs):
        """Continuations of `prompts` (a str or a list of strs), as text.

        Keyword arguments are `stream_ids`'s. Returns a str for a str
        prompt, else a list of strs (the new text only).
        """
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        ids = self.generate_ids(batch, max_new_tokens, **kwargs)
        texts = [self.tokenizer.decode(row) for row in ids]
        return texts[0] if single else texts

    def _prompt_ids(self, prompts):
        prompts = one_or_more(prompts, "prompts", "pass at least one prompt")
        if all(isinstance(x, str) for x in prompts):
            return self.tokenize(prompts)
        vocab = self.metadata["vocabulary_size"]
        rows = []
        for i, row in enumerate(prompts):
            row = np.asarray(row)
            if row.ndim != 1 or row.size == 0 or row.dtype.kind not in "iu":
                raise ValueError(
                    f"Prompt {i} must be a str or a non-empty list of int token "
                    f"ids; got {prompts[i]!r}."
                )
            if row.min() < 0 or row.max() >= vocab:
                raise ValueError(
                    f"Prompt {i} has a token id outside [0, vocabulary_size={vocab})."
                )
            rows.append([int(t) for t in row])
        return rows

    def _stop_ids(self, stop_token_ids):
        if isinstance(stop_token_ids, str):
            if stop_token_ids != "auto":
                raise ValueError(
                    '`stop_token_ids` must be "auto", None or ids; got '
                    f"{stop_token_ids!r}."
                )
            return np.asarray(self.metadata["stop_token_ids"], "int64")
        if stop_token_ids is None:
            return np.zeros((0,), "int64")
        return np.asarray(list(stop_token_ids), "int64").reshape(-1)


class _IncrementalDecoder:
    """Text of a growing id sequence, released in whole characters.

    Decodes only the ids since the last release (plus a few before, for
    SentencePiece's leading-space rule), so the cost per token is constant.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.released = ""

    def push(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # a character still missing bytes
        new = text[len(self.released) :]
        # Keep the last id as context; drop what is already released.
        self.ids = self.ids[-1:]
        self.released = self.tokenizer.decode(self.ids)
        return new


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")


def _sampler(name, k, p, temperature, rng):
    """`fn(logits [b, v]) -> int64 [b]` for the sampler `name`."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; use one of {list(SAMPLERS)}.")
    if name == "greedy":
        return lambda logits: np.argmax(logits, axis=-1)
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0; got {temperature!r}.")
    if name == "top_k":
        _check_positive_int(k, "k")
    elif not 0 < p <= 1:
        raise ValueError(f"`p` must be in (0, 1]; got {p!r}.")

    def sample(logits):
        logits = logits.astype("float64") / temperature
        order = np.argsort(-logits, axis=-1, kind="stable")
        top = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(top - top[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        if name == "top_k":
            probs[:, k:] = 0.0
        else:
            # Keep tokens until the probability before them reaches p.
            before = np.cumsum(probs, axis=-1) - probs
            probs[before >= p] = 0.0
        probs /= probs.sum(axis=-1, keepdims=True)
        u = rng.random((len(probs), 1))
        picked = np.minimum(
            (np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[1] - 1
        )
        return np.take_along_axis(order, picked[:, None], axis=-1)[:, 0]

    return sample


class _OnnxRuntime:
    def __init__(self, path, metadata):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        self.metadata = metadata
        self.sessions = {
            name: onnxruntime.InferenceSession(
                os.path.join(path, metadata["files"][name]),
                options,
                providers=["CPUExecutionProvider"],
            )
            for name in ("prefill", "decode_step")
        }

    def run(self, endpoint, arrays):
        names = self.metadata["inputs"][endpoint]
        feed = dict(zip(names, arrays, strict=True))
        return self.sessions[endpoint].run(self.metadata["outputs"], feed)


def _import_tensorflow():
    """`import tensorflow`, keeping out the frameworks it would pull in.

    TensorFlow's `__init__` imports Keras eagerly (to register its
    optimizers) and `tf.lite` tries JAX; neither is needed to run a
    SavedModel or a LiteRT file, and both skip what fails to import. Names
    already imported are left alone.
    """
    import importlib
    import sys

    blocked = [m for m in ("keras", "tf_keras", "jax", "torch") if m not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # makes `import name` raise ImportError
    try:
        return importlib.import_module("tensorflow")
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


class _SavedModelRuntime:
    def __init__(self, path, metadata):
        tf = _import_tensorflow()

        self.tf = tf
        self.metadata = metadata
        self.model = tf.saved_model.load(
            os.path.join(path, metadata["files"]["prefill"])
        )

    def run(self, endpoint, arrays):
        outputs = getattr(self.model, endpoint)(*[self.tf.constant(a) for a in arrays])
        return [outputs[name].numpy() for name in self.metadata["outputs"]]


class _LiteRTRuntime:
    def __init__(self, path, metadata):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # TensorFlow's copy of the same interpreter
            Interpreter = _import_tensorflow().lite.Interpreter
        self.metadata = metadata
        self.runners = {}
        for name in ("prefill", "decode_step"):
            interpreter = Interpreter(
                model_path=os.path.join(path, metadata["files"][name])
            )
            self.runners[name] = interpreter.get_signature_runner(name)

    def run(self, endpoint, arrays):
        names = self.metadata["inputs"][endpoint]
        outputs = self.runners[endpoint](**dict(zip(names, arrays, strict=True)))
        return [outputs[name] for name in self.metadata["outputs"]]


_RUNTIMES = {
    "onnx": _OnnxRuntime,
    "tf_saved_model": _SavedModelRuntime,
    "litert": _LiteRTRuntime,
}
