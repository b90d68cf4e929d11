"""Greedy generation speed, beside the official sampler and Hugging Face.

    KERAS_BACKEND=jax python tools/benchmark_generate.py --config cpu7m
    KERAS_BACKEND=torch python tools/benchmark_generate.py --config cpu7m --threads 1
    KERAS_BACKEND=jax python tools/benchmark_generate.py --config 2b  # GPU

One process builds one random model and runs, on the same weights and the
same prompts, side by side:

- `ours`: `RecurrentGemmaCausalLM.generate` (greedy) under `KERAS_BACKEND`.
  On torch `ours` is the default decode mode (`torch_default_decode_mode`)
  and `ours_<mode>` each other one of `--torch-modes` (`eager`, `graph`,
  `inductor`; see `keras_recurrentgemma.compiled_decode`).
- `official_jax`: the official `recurrentgemma.jax.Griffin` and its
  `Sampler` (greedy), by default when the backend is JAX. Its own compiled
  prompt-processing and sampling functions are called on token ids; its
  SentencePiece tokenize/detokenize around them are skipped.
- `hf_torch`: `transformers.RecurrentGemmaForCausalLM.generate` (greedy,
  `use_cache=True`), by default when the backend is torch.

`--oracles` runs both references on any backend, `--no-oracles` neither.

The weights: a `RecurrentGemmaBackbone` is initialised by Keras (seeded),
written out as an official Flax parameter tree with the block weights
doubled (at Keras's initial scale greedy decoding repeats one token), and
read back with `backbone_from_official`: that tree is what the official
model runs, and the Hugging Face state dict comes from the backbone through
the converter's map.

`--threads 1` is the fair setting on a CPU shared with other processes:
torch's OpenMP threads then wait for descheduled siblings, and a small op
that takes microseconds on one thread takes milliseconds on two.

Measures (each implementation's first call, compilation included, is
reported as `warmup_s`, apart from the timed repeats, which are interleaved
across implementations):

- `generate`: tokens/s for `--new-tokens` new tokens after a
  `--prompt-length` prompt, per batch size (`--batch-sizes`); no stop token.
  `decode_ms_per_step` is the time difference between `--new-tokens` and
  `--short-new-tokens` new tokens, per extra token. `agreement`: the greedy
  tokens of each reference against ours, row by row.
- `prefill`: tokens/s of a `--prefill-batch` x `--prefill-length` prompt
  absorbed by generating one token. Hugging Face attends to the whole prompt
  past `attention_window_size` (its mask differs from the official model's),
  so its first token is not compared there.
- `memory`: peak memory of `prefill(ids, chunk_size=--context-chunk)` per
  context length in `--contexts`, each in a fresh process: device memory on
  a GPU, resident memory (RSS) on a CPU.

Floats are rounded; times are seconds unless named `_ms`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX and TensorFlow would otherwise take most of a GPU's memory up front,
# which leaves none to a second framework and makes peaks meaningless.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

# With Triton installed, a process that has loaded TensorFlow (KerasHub
# does, on every backend) aborts in LLVM when Triton loads after it, as
# `transformers` or `torch.compile` make it do: load it first.
try:
    import triton  # noqa: E402, F401
except ImportError:
    pass

import warnings  # noqa: E402

import numpy as np  # noqa: E402

# The official sampler donates buffers, which a CPU cannot reuse.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

GRIFFIN = ["recurrent", "recurrent", "attention"]
CONFIGS = {
    # Griffin's pattern at a size a CPU decodes at hundreds of tokens/s.
    "cpu7m": dict(
        vocabulary_size=8192,
        hidden_dim=256,
        intermediate_dim=768,
        num_heads=4,
        lru_width=256,
        block_types=GRIFFIN * 2,
        attention_window_size=256,
    ),
    # The official `Preset.RECURRENT_GEMMA_2B_V1`.
    "2b": dict(
        vocabulary_size=256_000,
        hidden_dim=2560,
        intermediate_dim=3 * 2560,
        num_heads=10,
        lru_width=2560,
        block_types=(GRIFFIN * 9)[:26],
        attention_window_size=2048,
    ),
}
TORCH_MODES = ("auto", "eager", "graph", "inductor")
BLOCK_SCALE = 2.0


# --- Devices and versions --------------------------------------------------------


def accelerator(backend):
    """`"gpu"` if the backend sees a GPU, else `"cpu"`."""
    if backend == "jax":
        import jax

        return "gpu" if jax.devices()[0].platform == "gpu" else "cpu"
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def device_name(kind):
    if kind == "gpu":
        try:
            import torch

            return torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - only a label
            return "gpu"
    return f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"


def versions():
    import importlib.metadata as md

    out = {}
    for name in ("keras", "keras-hub", "jax", "tensorflow", "torch"):
        out[name] = _version(md, name)
    for name in ("recurrentgemma", "transformers"):
        out[name] = _version(md, name)
    return out


def _version(md, name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# --- Weights ---------------------------------------------------------------------


def official_tree(backbone, block_scale=1.0):
    """The official Flax parameter tree holding `backbone`'s weights.

    The inverse of `backbone_from_official`: below `blocks.i/` every tensor
    keeps its name, except the MLP's gate and up projections, which the
    official model stacks into one `ffw_up`; kernels are transposed to
    `[in, out]`. Block weights other than norm
    scales and `a_param` are multiplied by `block_scale`.
    """
    tree = {}

    def put(path, value):
        if path.startswith("blocks.") and not path.endswith(("/scale", "/a_param")):
            value = value * np.asarray(block_scale, value.dtype)
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    stacked = {}
    for v in backbone.weights:
        value = np.asarray(_numpy(v))
        if v.path.endswith("/kernel"):
            value = value.T  # ours `[out, in]`, official `[in, out]`
        top, _, rest = v.path.partition("/")
        if top == "token_embedding":
            put("embedder/input_embedding", value)
        elif top == "final_norm":
            put("final_norm/scale", value)
        elif rest.startswith(("mlp_block/ffw_gate/", "mlp_block/ffw_up/")):
            name, kind = rest.split("/")[1:]
            stacked.setdefault((top, kind), {})[name] = value
        else:
            put(f"blocks.{top.rsplit('_', 1)[1]}/{rest}", value)
    for (top, kind), parts in stacked.items():
        both = np.stack([parts["ffw_gate"], parts["ffw_up"]])
        key = "w" if kind == "kernel" else "b"
        if kind == "bias":
            both = both[:, None, None, :]
        put(f"blocks.{top.rsplit('_', 1)[1]}/mlp_block/ffw_up/{key}", both)
    return tree


def _numpy(variable):
    from keras import ops

    value = ops.convert_to_numpy(variable.value)
    return value


def hf_state_dict(backbone, torch_dtype):
    """Hugging Face tensors for `backbone`, through the converter's map."""
    import torch

    from keras_recurrentgemma.convert.huggingface import weight_map

    values = {v.path: np.asarray(_numpy(v), np.float32) for v in backbone.weights}
    state = {}
    for path, key, transform in weight_map(backbone):
        array = values[path]  # "linear": HF's `[out, in]`, as ours
        if transform == "conv":
            array = array.T[:, None, :]
        state[key] = torch.from_numpy(np.ascontiguousarray(array)).to(torch_dtype)
    return state


def build_models(args, backend):
    """`(ours, official tree or None)` on the same random weights."""
    import keras

    from keras_recurrentgemma import RecurrentGemmaBackbone
    from keras_recurrentgemma import RecurrentGemmaCausalLM
    from keras_recurrentgemma.convert.official import backbone_from_official

    config = CONFIGS[args.config]
    keras.utils.set_random_seed(args.seed)
    initial = RecurrentGemmaBackbone(**config, dtype=args.dtype)
    # At Keras's initial scale the blocks barely move the residual stream,
    # and greedy decoding repeats one token forever (a cache bug could
    # agree with that); twice that scale gives varied continuations.
    tree = official_tree(initial, block_scale=BLOCK_SCALE)
    del initial
    backbone = backbone_from_official(
        tree,
        dtype=args.dtype,
        attention_window_size=config["attention_window_size"],
    )
    return RecurrentGemmaCausalLM(backbone, preprocessor=None), tree


# --- Implementations -----------------------------------------------------------------


class Ours:
    def __init__(self, backbone, torch_decode_mode=None, name="ours"):
        from keras_recurrentgemma import RecurrentGemmaCausalLM

        self.name = name
        # One task per decode mode, all on the same backbone.
        self.lm = RecurrentGemmaCausalLM(backbone, preprocessor=None)
        self.lm.compile(sampler="greedy")
        if torch_decode_mode is not None:
            self.lm.torch_decode_mode = torch_decode_mode

    def generate(self, prompt, new_tokens):
        from keras import ops

        b, p = prompt.shape
        ids = np.zeros((b, p + new_tokens), "int32")
        ids[:, :p] = prompt
        mask = (np.arange(p + new_tokens) < p)[None].repeat(b, 0).astype("int32")
        out = self.lm.generate(
            {"token_ids": ids, "padding_mask": mask}, stop_token_ids=None
        )
        return np.asarray(ops.convert_to_numpy(out["token_ids"]))[:, p:]


class _Vocab:
    """What the official `Sampler` asks of its SentencePiece vocabulary when
    it is handed token ids (pad 0, eos 1, bos 2, as in the released
    tokenizer)."""

    def pad_id(self):
        return 0

    def eos_id(self):
        return 1

    def bos_id(self):
        return 2


class OfficialJax:
    name = "official_jax"

    def __init__(self, tree, config, dtype):
        import jax
        import jax.numpy as jnp
        import recurrentgemma.jax

        from keras_recurrentgemma.convert.reference import griffin_config

        self.jnp = jnp
        jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        model = recurrentgemma.jax.Griffin(
            griffin_config(config),
            gradient_checkpointing=False,
            dtype=jdtype,
            param_dtype=jdtype,
        )
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jdtype), tree)
        self.sampler = recurrentgemma.jax.Sampler(
            model=model, vocab=_Vocab(), params=params
        )

    def generate(self, prompt, new_tokens):
        # `Sampler.__call__` without its tokenize and detokenize.
        b, p = prompt.shape
        s = self.sampler
        state = s.prompt_processing_fn(
            s.params,
            self.jnp.asarray(prompt, self.jnp.int32),
            None,
            self.jnp.full((b,), p, self.jnp.int32),
            new_tokens,
            False,
            False,
        )
        if new_tokens > 1:
            state = s.sample_fn(s.params, state, False)
        return np.asarray(state.tokens_buffer)


class HfTorch:
    name = "hf_torch"

    def __init__(self, backbone, config, dtype):
        import torch
        from transformers import RecurrentGemmaConfig
        from transformers import RecurrentGemmaForCausalLM

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        hf_config = RecurrentGemmaConfig(
            num_hidden_layers=len(config["block_types"]),
            vocab_size=config["vocabulary_size"],
            hidden_size=config["hidden_dim"],
            # Hugging Face stores twice our MLP width.
            intermediate_size=2 * config["intermediate_dim"],
            num_attention_heads=config["num_heads"],
            num_key_value_heads=1,
            lru_width=config["lru_width"],
            attention_window_size=config["attention_window_size"],
            block_types=list(config["block_types"]),
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
        model = RecurrentGemmaForCausalLM(hf_config).eval()
        missing, unexpected = model.load_state_dict(
            hf_state_dict(backbone, torch.float32), strict=False
        )
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"HF state dict: {missing=} {unexpected=}")
        model.tie_weights()
        self.model = model.to(self.device, torch_dtype)

    def generate(self, prompt, new_tokens):
        torch = self.torch
        ids = torch.as_tensor(prompt, dtype=torch.long, device=self.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                # No stop token: every row runs to `max_new_tokens`.
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
            )
        return out[:, prompt.shape[1] :].cpu().numpy()


def synchronize():
    """Waits for queued GPU work (torch; JAX and TF results are fetched)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


def timed(impl, prompt, new_tokens):
    synchronize()
    start = time.perf_counter()
    tokens = impl.generate(prompt, new_tokens)
    synchronize()
    return time.perf_counter() - start, tokens


def agreement(ours, theirs):
    """Row-by-row agreement of two `[b, n]` greedy continuations."""
    equal = ours == theirs
    first = [int(np.argmin(row)) if not row.all() else None for row in equal]
    return {
        "rows_identical": int(equal.all(axis=1).sum()),
        "rows": int(equal.shape[0]),
        "tokens_equal_fraction": round(float(equal.mean()), 4),
        "first_mismatch_per_row": first,
    }


def run_generate(impls, args, rng):
    rows = []
    vocab = CONFIGS[args.config]["vocabulary_size"]
    for batch in args.batch_sizes:
        prompt = rng.integers(3, vocab, (batch, args.prompt_length)).astype("int32")
        row = {"batch": batch, "prompt_length": args.prompt_length, "results": {}}
        tokens, times, short = {}, {}, {}
        for impl in impls:
            warm, tokens[impl.name] = timed(impl, prompt, args.new_tokens)
            short_warm, _ = timed(impl, prompt, args.short_new_tokens)
            row["results"][impl.name] = {
                "warmup_s": round(warm, 3),
                "short_warmup_s": round(short_warm, 3),
            }
            times[impl.name], short[impl.name] = [], []
            print(f"warm: {impl.name} batch {batch}", file=sys.stderr, flush=True)
        for _ in range(args.repeats):
            for impl in impls:
                t, out = timed(impl, prompt, args.new_tokens)
                times[impl.name].append(t)
                if not np.array_equal(out, tokens[impl.name]):
                    row["results"][impl.name]["nondeterministic"] = True
                short[impl.name].append(timed(impl, prompt, args.short_new_tokens)[0])
        for impl in impls:
            t = statistics.median(times[impl.name])
            extra = args.new_tokens - args.short_new_tokens
            decode = (t - statistics.median(short[impl.name])) / extra
            generated = tokens[impl.name]
            row["results"][impl.name].update(
                {
                    "times_s": [round(x, 4) for x in times[impl.name]],
                    "tokens_per_s": round(batch * args.new_tokens / t, 1),
                    "best_tokens_per_s": round(
                        batch * args.new_tokens / min(times[impl.name]), 1
                    ),
                    "decode_ms_per_step": round(1e3 * decode, 3),
                    "distinct_tokens_row0": len(set(generated[0].tolist())),
                }
            )
        ours = tokens["ours"]
        row["agreement_with_ours"] = {
            name: agreement(ours, out) for name, out in tokens.items() if name != "ours"
        }
        rows.append(row)
    return rows


def run_prefill(impls, args, rng):
    vocab = CONFIGS[args.config]["vocabulary_size"]
    window = CONFIGS[args.config]["attention_window_size"]
    shape = (args.prefill_batch, args.prefill_length)
    prompt = rng.integers(3, vocab, shape).astype("int32")
    out = {"batch": shape[0], "length": shape[1], "results": {}}
    first = {}
    for impl in impls:
        warm, first[impl.name] = timed(impl, prompt, 1)
        times = [timed(impl, prompt, 1)[0] for _ in range(args.prefill_repeats)]
        t = statistics.median(times)
        out["results"][impl.name] = {
            "warmup_s": round(warm, 3),
            "times_s": [round(x, 4) for x in times],
            "tokens_per_s": round(shape[0] * shape[1] / t, 1),
        }
        print(f"prefill: {impl.name}", file=sys.stderr, flush=True)
    out["first_token_agreement_with_ours"] = {
        name: agreement(first["ours"], tokens)
        for name, tokens in first.items()
        if name != "ours" and not (name == "hf_torch" and shape[1] > window)
    }
    return out


# --- Memory against context length (one process per length) -------------------------


def measure_memory(args, backend, kind):
    """Peak memory of one chunked prefill of `args.child_context` tokens."""
    import keras

    from keras_recurrentgemma import RecurrentGemmaBackbone
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    keras.utils.set_random_seed(args.seed)
    lm = RecurrentGemmaCausalLM(
        RecurrentGemmaBackbone(**CONFIGS[args.config], dtype=args.dtype), None
    )
    length, chunk = args.child_context, args.context_chunk
    rng = np.random.default_rng(args.seed)
    vocab = CONFIGS[args.config]["vocabulary_size"]
    ids = rng.integers(3, vocab, (1, length)).astype("int32")
    lm.prefill(ids[:, : min(chunk, length)], chunk_size=chunk)  # Warm-up.
    if length % chunk:
        lm.prefill(ids[:, : length % chunk], chunk_size=chunk)
    record = {"context": length, "chunk_size": chunk}
    if kind == "cpu":
        from benchmark_long_prefill import RssMonitor
        from benchmark_long_prefill import _status_bytes

        baseline = _status_bytes("VmRSS")
        monitor = RssMonitor()
        monitor.start()
    else:
        baseline = _reset_device_peak(backend)
    start = time.perf_counter()
    cache = lm.prefill(ids, chunk_size=chunk)
    keras.ops.convert_to_numpy(cache.hidden)
    record["prefill_s"] = round(time.perf_counter() - start, 3)
    if kind == "cpu":
        peak, _ = monitor.stop()
        record.update(
            measure="peak RSS",
            peak_bytes=peak,
            baseline_bytes=baseline,
            peak_over_baseline_bytes=peak - baseline,
            method=monitor.method,
        )
    else:
        peak = _device_peak(backend)
        record.update(
            measure="peak device memory in use",
            peak_bytes=peak,
            baseline_bytes=baseline,
            peak_over_baseline_bytes=peak - baseline,
        )
    record["tokens_per_s"] = round(length / record["prefill_s"], 1)
    return record


def _reset_device_peak(backend):
    """Resets the peak where the framework can; returns memory in use now."""
    if backend == "torch":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")
        return tf.config.experimental.get_memory_info("GPU:0")["current"]
    import jax

    # JAX keeps a lifetime peak; a fresh process, after a warm-up of one
    # chunk, is the nearest to a reset.
    return jax.devices()[0].memory_stats()["bytes_in_use"]


def _device_peak(backend):
    if backend == "torch":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"]
    import jax

    return jax.devices()[0].memory_stats()["peak_bytes_in_use"]


def run_memory(argv, contexts):
    records = []
    for length in contexts:
        child = [sys.executable, os.path.abspath(__file__), *argv]
        child += ["--child-context", str(length)]
        out = subprocess.run(child, capture_output=True, text=True)
        if out.returncode:
            records.append({"context": length, "error": out.stderr[-2000:]})
            continue
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"memory: {length}", file=sys.stderr, flush=True)
    return records


# --- Main ------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu7m")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on a CPU",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--short-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--prefill-length", type=int, default=2048)
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument(
        "--contexts",
        type=int,
        nargs="*",
        default=None,
        help="context lengths for the memory section; default 2048 131072 on "
        "a GPU, 2048 32768 on a CPU; none skips it",
    )
    parser.add_argument("--context-chunk", type=int, default=2048)
    oracles = parser.add_mutually_exclusive_group()
    oracles.add_argument(
        "--oracles",
        action="store_true",
        help="run the official JAX sampler and HF transformers on any backend",
    )
    oracles.add_argument("--no-oracles", action="store_true")
    parser.add_argument(
        "--torch-modes",
        nargs="+",
        choices=TORCH_MODES,
        default=list(TORCH_MODES),
        help="torch: the decode modes of ours to measure",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (intra-op threads) for ours and HF",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        choices=("generate", "prefill", "memory"),
        default=[],
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-context", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import keras

    backend = keras.config.backend()
    kind = accelerator(backend)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if kind == "gpu" else "float32"
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.child_context is not None:
        print(json.dumps(measure_memory(args, backend, kind)), flush=True)
        return None

    load_before = os.getloadavg()
    skipped = []
    report = {
        "backend": backend,
        "device": f"{kind}: {device_name(kind)}",
        "config_name": args.config,
        "config": CONFIGS[args.config],
        "dtype": args.dtype,
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "child_context"},
    }
    if backend == "torch" or args.threads is not None:
        import torch

        report["torch_threads"] = torch.get_num_threads()

    start = time.perf_counter()
    causal_lm, tree = build_models(args, backend)
    report["build_s"] = round(time.perf_counter() - start, 2)

    impls = []
    if backend == "torch":
        default = causal_lm.torch_decode_mode
        report["torch_default_decode_mode"] = default
        modes = [default] + [m for m in args.torch_modes if m != default]
        for mode in modes:
            name = "ours" if mode == default else f"ours_{mode}"
            impls.append(Ours(causal_lm.backbone, mode, name=name))
    else:
        impls.append(Ours(causal_lm.backbone))

    want_official = not args.no_oracles and (args.oracles or backend == "jax")
    want_hf = not args.no_oracles and (args.oracles or backend == "torch")
    if want_official:
        try:
            impls.append(OfficialJax(tree, CONFIGS[args.config], args.dtype))
        except ImportError as e:
            skipped.append({"what": "official_jax", "why": f"not importable: {e}"})
    else:
        skipped.append(
            {"what": "official_jax", "why": "runs by default on JAX; --oracles"}
        )
    if want_hf:
        try:
            impls.append(HfTorch(causal_lm.backbone, CONFIGS[args.config], args.dtype))
        except ImportError as e:
            skipped.append({"what": "hf_torch", "why": f"not importable: {e}"})
    else:
        skipped.append(
            {"what": "hf_torch", "why": "runs by default on torch; --oracles"}
        )
    del tree

    rng = np.random.default_rng(args.seed)
    if "generate" not in args.skip:
        report["generate"] = run_generate(impls, args, rng)
    if "prefill" not in args.skip:
        # Prefill does not depend on the decode mode: one `ours` is enough.
        prefill_impls = [i for i in impls if not i.name.startswith("ours_")]
        report["prefill"] = run_prefill(prefill_impls, args, rng)
    contexts = args.contexts
    if contexts is None:
        contexts = [2048, 131072] if kind == "gpu" else [2048, 32768]
        if kind == "cpu":
            skipped.append(
                {
                    "what": "memory at 131072 tokens",
                    "why": "CPU: minutes per backend; pass --contexts to run it",
                }
            )
    if "memory" not in args.skip and contexts:
        report["memory"] = run_memory(argv, contexts)
    report["skipped"] = skipped
    report["load_average_before_after"] = [
        [round(x, 2) for x in load_before],
        [round(x, 2) for x in os.getloadavg()],
    ]
    report["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
