"""Quiet by default: no TensorFlow, absl or CUDA log lines on stderr.

KerasHub imports TensorFlow on every backend, and TensorFlow 2.21 logs from
C++ while it loads, whatever `TF_CPP_MIN_LOG_LEVEL` says (see
`keras_recurrentgemma.utils.quiet`). The subprocesses here run without
`TF_CPP_MIN_LOG_LEVEL` (the CI sets it to 3, which would hide the later
lines and make the test pass for the wrong reason), on the test's backend.
"""

import os
import subprocess
import sys

import keras
import pytest

from keras_recurrentgemma.utils.quiet import is_hidden

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.config.backend()

# Importing a public class imports Keras, KerasHub and TensorFlow; the bare
# `import keras_recurrentgemma` imports none of them.
IMPORT = (
    "import keras_recurrentgemma\n"
    "from keras_recurrentgemma import RecurrentGemmaCausalLM\n"
    "import tensorflow\n"
)
LOG_LINE = b"I0000 00:00:1796427618.047798   21246 cudart_stub.cc:31] no GPU\n"
NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are ...\n"


def _run(args, **env):
    environment = dict(os.environ, KERAS_BACKEND=BACKEND, PYTHONIOENCODING="utf-8")
    environment.pop("TF_CPP_MIN_LOG_LEVEL", None)
    environment.update(env)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [ROOT, environment.get("PYTHONPATH")])
    )
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        env=environment,
        cwd=ROOT,
        timeout=300,
    )
    err = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == 0, err
    return result.stdout.decode("utf-8", errors="replace"), err


def test_import_is_quiet():
    _, err = _run(["-c", IMPORT])
    assert err == "", f"importing printed to stderr:\n{err}"


def test_cli_is_quiet():
    # The README's first command, on the shipped preset, shortened.
    args = ["generate", "The function", "--backend", BACKEND, "--max-length", "12"]
    out, err = _run(["-m", "keras_recurrentgemma", *args])
    assert out.startswith("The function"), out
    assert err == "", f"the CLI printed to stderr:\n{err}"


def test_user_level_is_respected():
    # TF_CPP_MIN_LOG_LEVEL=0 asks for every line: nothing is filtered, and
    # TensorFlow's load-time lines (what the tests above prove absent) show.
    _, err = _run(["-c", IMPORT], TF_CPP_MIN_LOG_LEVEL="0")
    lines = [line.encode() + b"\n" for line in err.splitlines()]
    assert any(is_hidden(line, 3) for line in lines), err


@pytest.mark.parametrize(
    "line, level, hidden",
    [
        (LOG_LINE, 1, True),
        (LOG_LINE, 0, False),
        (LOG_LINE.replace(b"I0000", b"W0000"), 1, False),
        (LOG_LINE.replace(b"I0000", b"W0000"), 2, True),
        (LOG_LINE.replace(b"I0000", b"E1204"), 2, False),
        (LOG_LINE.replace(b"I0000", b"E1204"), 3, True),
        (LOG_LINE.replace(b"I0000", b"F0000"), 3, False),
        (NOTICE, 1, True),
        (NOTICE, 0, False),
        (b"UserWarning: something the user should see\n", 3, False),
        (b"I0000 is how my own message starts\n", 3, False),
    ],
)
def test_is_hidden_follows_tensorflow_levels(line, level, hidden):
    assert is_hidden(line, level) is hidden


def test_filtered_stderr_keeps_other_lines(capfd):
    from keras_recurrentgemma.utils.quiet import _FilteredStderr

    stderr = _FilteredStderr(level=3)
    stderr.start()
    os.write(2, LOG_LINE + b"a traceback line\n" + LOG_LINE + b"last words")
    stderr.stop()
    assert capfd.readouterr().err == "a traceback line\nlast words"
