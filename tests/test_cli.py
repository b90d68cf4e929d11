"""Streaming generation (`keras_recurrentgemma.streaming`) and the command line.

Proves that `stream_generate` yields the very tokens `generate` returns
(greedy, over one or several prefill chunks; and seeded random sampling,
with TensorFlow's `generate` out of XLA, whose random numbers differ from
eager ones), stops after a stop token without printing it, holds back a
character split over byte-fallback tokens, and refuses beam/contrastive
search and prompts over `max_length`; and that `python -m
keras_recurrentgemma` streams that text to stdout (flushed piece by piece),
runs beam and contrastive search without streaming, chats only with
instruction-tuned presets (unless `--force`) while keeping the
conversation, and trimming it when it outgrows `--max-length`, and reports a
bad preset or an oversized prompt in one line, without a traceback.

Most CLI tests call `cli.main` in this process, on the very models that
were saved as presets, so that their compiled step functions are shared;
two load the presets in a subprocess, running the real `python -m` entry
point on this test's backend, once with `--backend` overriding a different
`KERAS_BACKEND`.

The tiny models have random weights, so no test predicts their text: every
expectation comes from the library (`generate`, `chat`, `stream_generate`).
For the chat tests, the instruction-tuned preset's embedding swaps `<eos>`
with the token it would say first to one of `FIRST_MESSAGES`, so that its
reply to that message is empty and the next turn sees a short history.
"""

import io
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops
from keras_hub.samplers import BeamSampler
from keras_hub.samplers import ContrastiveSampler

from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import cli
from keras_recurrentgemma import format_chat
from keras_recurrentgemma.streaming import PromptTooLongError
from keras_recurrentgemma.streaming import TextStream
from keras_recurrentgemma.streaming import get_sampler
from keras_recurrentgemma.streaming import prompt_token_ids
from keras_recurrentgemma.streaming import stream_generate
from keras_recurrentgemma.streaming import stream_token_ids
from tests.models import tiny_causal_lm

BACKEND = keras.config.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One length for most runs: each new shape is a new compilation.
MAX_LENGTH = 40
CHAT_MAX_LENGTH = 64
PROMPTS = ["The quick brown", "Hello", "Rain fell on the quiet town while the"]
FIRST_MESSAGES = ["Hi", "Hello world", "Write a letter", "The rain"]


# --- Fixtures -----------------------------------------------------------------


def _swap_rows(embedding, i, j):
    table = ops.convert_to_numpy(embedding.embeddings).copy()
    table[[i, j]] = table[[j, i]]
    embedding.embeddings.assign(table)


def _make_reply_empty(causal_lm, max_length):
    """Makes greedy decoding answer one first message with `<eos>` at once.

    Swaps `<eos>` with the token the model would say first, for a message
    whose prompt contains neither (the prompt's state is then unchanged).

    Returns:
        The message.
    """
    eos = causal_lm.preprocessor.tokenizer.end_token_id
    for message in FIRST_MESSAGES:
        ids = prompt_token_ids(causal_lm, format_chat([("user", message)]))
        first = next(stream_token_ids(causal_lm, ids, max_length, "greedy", None))
        if first != eos and first not in ids and eos not in ids:
            _swap_rows(causal_lm.backbone.token_embedding, first, eos)
            return message
    raise AssertionError("no candidate message works; add one")


@pytest.fixture(scope="module")
def loaded():
    """Preset directory -> causal LM, each loaded (or made) once."""
    return {}


@pytest.fixture(scope="module")
def presets(tmp_path_factory, loaded):
    """Two tiny presets on disk: a base model and an instruction-tuned one.

    The in-process tests share the models that were saved (as `loaded`),
    with their compiled functions; the subprocess tests load the files.
    """
    root = tmp_path_factory.mktemp("presets")
    # Small prefill chunks: the longer prompts take several, and every
    # `max_length` shares one compiled prefill.
    base = tiny_causal_lm(sequence_length=32, prefill_chunk_size=8)
    it = tiny_causal_lm(sequence_length=32, prefill_chunk_size=8, seed=1)
    it = RecurrentGemmaCausalLM(it.backbone, it.preprocessor, instruction_tuned=True)
    first_message = _make_reply_empty(it, CHAT_MAX_LENGTH)
    paths = {"base": str(root / "base"), "it": str(root / "it")}
    for name, model in [("base", base), ("it", it)]:
        model.save_to_preset(paths[name])
        loaded[paths[name]] = model
    return {**paths, "first": first_message}


@pytest.fixture
def run_cli(monkeypatch, loaded):
    """Runs `cli.main(argv)` with `stdin`; returns the exit status."""
    real_load = cli._load

    def load(preset):
        if preset not in loaded:
            loaded[preset] = real_load(preset)
        return loaded[preset]

    monkeypatch.setattr(cli, "_load", load)

    def run(*argv, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        return cli.main([str(a) for a in argv])

    return run


@pytest.fixture
def base_lm(presets, loaded):
    return loaded[presets["base"]]


@pytest.fixture
def it_lm(presets, loaded):
    return loaded[presets["it"]]


def _generate_ids(causal_lm, prompt_ids, max_length, stop_token_ids=None):
    """`generate`'s new token ids (up to and including a stop token)."""
    token_ids = np.zeros((1, max_length), "int32")
    token_ids[0, : len(prompt_ids)] = prompt_ids
    mask = np.zeros((1, max_length), "bool")
    mask[0, : len(prompt_ids)] = True
    outputs = causal_lm.make_generate_function()(
        {"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=stop_token_ids
    )
    tokens = ops.convert_to_numpy(outputs["token_ids"])[0, len(prompt_ids) :]
    keep = ops.convert_to_numpy(outputs["padding_mask"])[0, len(prompt_ids) :]
    return [int(t) for t in tokens[keep.astype(bool)]]


def _line(text):
    """What the CLI prints for a reply: the text, ended by a newline."""
    return text if text.endswith("\n") else text + "\n"


# --- stream_generate ----------------------------------------------------------


def test_greedy_stream_is_generate(base_lm):
    base_lm.compile(sampler="greedy")
    # The last prompt spans several prefill chunks, the last one padded.
    n = len(prompt_token_ids(base_lm, PROMPTS[-1]))
    assert n > base_lm.prefill_chunk_size and n % base_lm.prefill_chunk_size
    for prompt in PROMPTS:
        stream = stream_generate(base_lm, prompt, MAX_LENGTH, stop_token_ids=None)
        pieces = list(stream)
        ids = prompt_token_ids(base_lm, prompt)
        assert stream.token_ids == _generate_ids(base_lm, ids, MAX_LENGTH), prompt
        assert len(stream.token_ids) == MAX_LENGTH - len(ids)
        assert stream.finish_reason == "length"
        expected = base_lm.generate(
            prompt, MAX_LENGTH, stop_token_ids=None, strip_prompt=True
        )
        assert "".join(pieces) == stream.text == expected, prompt
        assert len(pieces) > 1


def test_stream_stops_after_a_stop_token(base_lm):
    prompt = PROMPTS[0]
    ids = prompt_token_ids(base_lm, prompt)
    full = stream_generate(base_lm, prompt, MAX_LENGTH, stop_token_ids=None)
    full.read()
    # A token that first appears a few steps in.
    k = next(
        i
        for i, t in enumerate(full.token_ids)
        if i >= 3 and t not in full.token_ids[:i]
    )
    stop = full.token_ids[k]
    stream = stream_generate(base_lm, prompt, MAX_LENGTH, stop_token_ids=(stop,))
    text = stream.read()
    assert stream.finish_reason == "stop"
    assert stream.token_ids == full.token_ids[: k + 1]
    assert stream.token_ids == _generate_ids(base_lm, ids, MAX_LENGTH, (stop,))
    # The stop token's own text is not part of the reply.
    tokenizer = base_lm.preprocessor.tokenizer
    decoded = tokenizer.detokenize(ids[1:] + full.token_ids[:k])
    assert text == decoded[len(tokenizer.detokenize(ids[1:])) :]


def test_seeded_sampling_is_repeatable_and_matches_generate(base_lm):
    prompt = PROMPTS[1]
    ids = prompt_token_ids(base_lm, prompt)

    def streamed():
        stream = stream_generate(
            base_lm, prompt, MAX_LENGTH, get_sampler("top_p", seed=7, p=0.9), None
        )
        stream.read()
        return stream.token_ids

    first = streamed()
    assert streamed() == first
    # XLA draws other random numbers from the same seed than TensorFlow's
    # eager kernels, so this comparison needs `generate` out of XLA there.
    base_lm.compile(sampler=get_sampler("top_p", seed=7, p=0.9), jit_compile=False)
    try:
        assert _generate_ids(base_lm, ids, MAX_LENGTH) == first
    finally:
        base_lm.compile(sampler="greedy")


def test_text_stream_holds_back_a_split_character(base_lm):
    tokenizer = base_lm.preprocessor.tokenizer
    prompt = prompt_token_ids(base_lm, "Hello")
    tokens = [int(t) for t in tokenizer("world é!")]
    # "é" is spelled as its two UTF-8 bytes, one token each.
    assert len(tokens) >= 3 and tokenizer.detokenize(tokens[-3:-1]) == "é"
    stops = (tokenizer.end_token_id,)
    stream = TextStream(base_lm, prompt, iter(tokens + list(stops)), stops)
    pieces = list(stream)
    assert "".join(pieces) == "world é!"
    assert not any("\ufffd" in piece for piece in pieces)
    assert stream.finish_reason == "stop"
    assert stream.token_ids == tokens + list(stops)


@pytest.mark.parametrize("sampler", ["beam", "contrastive"])
def test_stream_refuses_samplers_that_cannot_stream(base_lm, sampler):
    with pytest.raises(ValueError, match="cannot stream"):
        stream_generate(base_lm, "Hello", MAX_LENGTH, sampler=sampler)


def test_stream_refuses_a_prompt_over_max_length(base_lm):
    with pytest.raises(PromptTooLongError, match="max_length=3") as info:
        stream_generate(base_lm, "The quick brown fox", max_length=3)
    assert info.value.num_tokens > 3
    # A prompt of exactly max_length tokens generates nothing, as `generate`.
    n = len(prompt_token_ids(base_lm, "Hello"))
    stream = stream_generate(base_lm, "Hello", max_length=n)
    assert stream.read() == "" and stream.finish_reason == "length"


# --- The command line, in this process ----------------------------------------


class _RecordingStdout(io.StringIO):
    """Records every `write` and `flush`, to see text leave as it comes."""

    def __init__(self):
        super().__init__()
        self.events = []

    def write(self, text):
        self.events.append(("write", text))
        return super().write(text)

    def flush(self):
        self.events.append(("flush", None))
        super().flush()


def test_generate_streams_the_prompt_and_its_continuation(
    presets, run_cli, base_lm, monkeypatch
):
    prompt = PROMPTS[0]
    expected = stream_generate(base_lm, prompt, MAX_LENGTH).read()
    stdout = _RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    args = ["--preset", presets["base"], "--max-length", MAX_LENGTH]
    assert run_cli("generate", prompt, *args) == 0
    assert stdout.getvalue() == _line(prompt + expected)
    writes = [i for i, (kind, _) in enumerate(stdout.events) if kind == "write"]
    assert len(writes) > 3
    # Each piece is flushed before the next token is computed.
    assert all(stdout.events[i + 1][0] == "flush" for i in writes)


def test_generate_options(presets, run_cli, base_lm, capsys):
    prompt = PROMPTS[1]
    greedy = stream_generate(base_lm, prompt, MAX_LENGTH).read()
    args = ["--preset", presets["base"], "--max-length", MAX_LENGTH]
    # --no-stream (the compiled `generate`) prints the same text; the prompt
    # comes from stdin, less echo's newline, and --strip-prompt leaves it out.
    stdin = prompt + "\n"
    assert run_cli("generate", *args, "--no-stream", "--strip-prompt", stdin=stdin) == 0
    assert capsys.readouterr().out == _line(greedy)
    # Beam and contrastive search cannot stream: they run as `generate` with
    # that sampler for the one call, leaving the model's own sampler as it
    # was, and print at the end.
    own = base_lm.sampler
    for sampler, sampler_class in [
        ("beam", BeamSampler),
        ("contrastive", ContrastiveSampler),
    ]:
        assert run_cli("generate", prompt, *args, "--sampler", sampler) == 0
        assert base_lm.sampler is own
        base_lm.compile(sampler=sampler_class())
        expected = base_lm.generate(prompt, MAX_LENGTH, strip_prompt=True)
        base_lm.compile(sampler=own)
        assert capsys.readouterr().out == _line(prompt + expected)
    base_lm.compile(sampler="greedy")
    # A seeded sampler repeats itself.
    seeded = [*args, "--sampler", "top_k", "--k", "3", "--seed", "5"]
    assert run_cli("generate", prompt, *seeded, "--temperature", "0.8") == 0
    first = capsys.readouterr().out
    assert run_cli("generate", prompt, *seeded, "--temperature", "0.8") == 0
    assert capsys.readouterr().out == first


def test_shared_options_go_before_or_after_the_command():
    parser = cli.build_parser()
    args = parser.parse_args(["--sampler", "top_k", "--seed", "3", "generate", "x"])
    assert (args.sampler, args.seed, args.max_length) == ("top_k", 3, 128)
    args = parser.parse_args(["--sampler", "beam", "chat", "--sampler", "top_p"])
    assert (args.sampler, args.seed, args.max_length) == ("top_p", None, 512)
    assert args.message is None and not args.no_stream


def test_generate_errors_are_one_line(presets, run_cli, capsys, tmp_path):
    missing = tmp_path / "no_such_preset"
    assert run_cli("generate", "Hi", "--preset", missing) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load preset '{missing}'")
    assert "Traceback" not in err

    too_long = "The quick brown fox jumps over the lazy dog."
    args = ["--preset", presets["base"], "--max-length", 5]
    assert run_cli("generate", too_long, *args) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: the prompt is ")
    assert "more than --max-length 5" in captured.err
    assert captured.out == ""

    # argparse's own usage errors exit with 2.
    with pytest.raises(SystemExit) as info:
        run_cli("generate", "Hi", "--sampler", "nucleus")
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        run_cli("generate", "Hi", "--max-length", "0")
    capsys.readouterr()


def test_backend_already_imported_is_an_error(run_cli, capsys):
    other = next(b for b in cli.BACKENDS if b != BACKEND)
    assert run_cli("generate", "Hi", "--backend", other) == 1
    err = capsys.readouterr().err
    assert f"already imported with the {BACKEND} backend" in err
    assert f"--backend {other} cannot take effect" in err


def test_chat_needs_an_instruction_tuned_preset(presets, run_cli, base_lm, capsys):
    args = ["Hi", "--preset", presets["base"], "--max-length", MAX_LENGTH]
    assert run_cli("chat", *args) == 1
    err = capsys.readouterr().err
    assert "is not instruction-tuned" in err and "generate" in err and "--force" in err
    # --force chats anyway, stopping at <eos> or <end_of_turn> as `chat` does.
    assert run_cli("chat", *args, "--force") == 0
    tokenizer = base_lm.preprocessor.tokenizer
    stops = (tokenizer.end_token_id, tokenizer.end_of_turn_id)
    prompt = format_chat([("user", "Hi")])
    reply = stream_generate(base_lm, prompt, MAX_LENGTH, stop_token_ids=stops).read()
    assert capsys.readouterr().out == _line(reply)


def test_chat_keeps_the_conversation(presets, run_cli, it_lm, capsys, monkeypatch):
    first, second = presets["first"], "Rain fell"
    args = ["--preset", presets["it"], "--max-length", CHAT_MAX_LENGTH]
    # Blank lines are skipped; the first reply is empty (see the fixture).
    assert run_cli("chat", *args, stdin=f"{first}\n\n{second}\n") == 0
    captured = capsys.readouterr()
    history = [("user", first), ("model", ""), ("user", second)]
    assert it_lm.chat(history[:1], max_length=CHAT_MAX_LENGTH) == ""
    reply = it_lm.chat(history, max_length=CHAT_MAX_LENGTH)
    assert captured.out == "\n" + _line(reply)
    assert "dropped" not in captured.err

    # The one-shot form answers one message.
    assert run_cli("chat", second, *args) == 0
    alone = it_lm.chat(history[2:], max_length=CHAT_MAX_LENGTH)
    assert capsys.readouterr().out == _line(alone)

    # On a terminal, each turn is asked for with a prompt.
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(cli.sys, "stdin", Terminal(f"{second}\n"))
    assert cli.main(["chat", *map(str, args)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "> " + _line(alone) + "> "
    assert "Ctrl-D" in captured.err


def test_chat_drops_old_turns_and_survives_a_message_too_long(
    presets, run_cli, it_lm, capsys
):
    first, second = presets["first"], "Rain fell"

    def length(turns):
        return len(prompt_token_ids(it_lm, format_chat(turns)))

    with_history = length([("user", first), ("model", ""), ("user", second)])
    # Too short to keep the first exchange and leave a quarter for the reply.
    max_length = with_history + 2
    assert length([("user", second)]) < max_length - max_length // 4
    too_long = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    assert length([("user", too_long)]) >= max_length
    stdin = f"{first}\n{too_long}\n{second}\n"
    args = ["--preset", presets["it"], "--max-length", max_length]
    assert run_cli("chat", *args, stdin=stdin) == 0
    captured = capsys.readouterr()
    reply = stream_generate(it_lm, format_chat([("user", second)]), max_length).read()
    assert captured.out == "\n" + _line(reply)
    assert "error: this message makes a prompt of" in captured.err
    assert "dropped the oldest 2 turns" in captured.err


# --- The command line, as a program -------------------------------------------


# A program run imports Keras and compiles in a fresh process, 10-15 s on JAX
# and TensorFlow (2 cores), for code the in-process tests above already run
# on every backend; so these two run on torch by default (all backends with
# --run_large). test_shipped_preset runs the README's command everywhere.
_program = pytest.mark.large if BACKEND != "torch" else pytest.mark.program


def _run_program(args, env_backend):
    env = dict(os.environ, KERAS_BACKEND=env_backend, PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    # Bytes, not text mode: the random model may write a "\r".
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, env=env, cwd=ROOT, timeout=300
    )
    err = result.stderr.decode("utf-8", errors="replace")
    return result.returncode, result.stdout.decode("utf-8"), err


@_program
def test_python_dash_m(presets, base_lm):
    prompt = PROMPTS[2]
    expected = stream_generate(base_lm, prompt, MAX_LENGTH).read()
    args = ["--preset", presets["base"], "--max-length", str(MAX_LENGTH)]
    code, out, err = _run_program(
        ["-m", "keras_recurrentgemma", "generate", prompt, *args], BACKEND
    )
    assert code == 0, err
    assert out == _line(prompt + expected)


@_program
def test_backend_option_overrides_the_environment(presets, it_lm):
    # Importing the CLI imports no Keras, so `--backend` can still choose.
    other = next(b for b in cli.BACKENDS if b != BACKEND)
    script = (
        "import sys\n"
        "import keras_recurrentgemma.cli as cli\n"
        "assert 'keras' not in sys.modules\n"
        "code = cli.main(sys.argv[1:])\n"
        "import keras\n"
        "print(keras.config.backend(), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    message = "Hello world"
    prompt = format_chat([("user", message)])
    expected = stream_generate(it_lm, prompt, CHAT_MAX_LENGTH).read()
    args = ["--preset", presets["it"], "--max-length", str(CHAT_MAX_LENGTH)]
    code, out, err = _run_program(
        ["-c", script, "chat", message, *args, "--backend", BACKEND], other
    )
    assert code == 0, err
    assert err.rstrip().endswith(BACKEND)
    assert out == _line(expected)
