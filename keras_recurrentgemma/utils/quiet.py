"""Keeps TensorFlow's start-up log lines off runs that did not ask for them.

KerasHub imports TensorFlow whenever it is installed (for `tf.data` and
tf-text), on the JAX and torch backends too. TensorFlow 2.21 then writes,
from C++, while its libraries load (twice: two of them carry their own copy
of absl):

    WARNING: All log messages before absl::InitializeLog() is called are ...
    I0000 00:00:... port.cc:153] oneDNN custom operations are on. ...
    I0000 00:00:... cudart_stub.cc:31] Could not find cuda drivers on ...

and, when it first looks for a GPU, `E0000 ... failed call to cuInit`.

`TF_CPP_MIN_LOG_LEVEL` hides the later lines but not the load-time ones:
absl writes every message to stderr until its logging is initialised,
whatever the level. So `quiet_tensorflow`, called by the package's
`__init__` before anything can import TensorFlow:

1. sets `TF_CPP_MIN_LOG_LEVEL` to `3` (hide INFO, WARNING and ERROR lines)
   unless the user set it;
2. unless that level is `0`, hooks the first `import tensorflow`: while it
   runs, file descriptor 2 goes to a temporary file; afterwards the file is
   written back to stderr without the log lines the level hides (and
   absl's "All log messages before ..." notice). Everything else written
   meanwhile (Python warnings, a traceback) comes back, in order.

`grain_read_ahead_warning_hidden` hides a grain warning that KerasHub's
`fit` earns on every call (see there).

Set `TF_CPP_MIN_LOG_LEVEL=0` to see every line. Caveats of the hook: output
from other threads while TensorFlow loads is held until it has loaded, and
a crash inside TensorFlow's import loses what its C++ code had written.
"""

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = "3"

# A glog/absl line: severity letter, MMDD, time, thread id, file:line]. Its
# severity is hidden when its index here is below the level. Before absl is
# initialised the seconds are since the epoch ("00:00:1796427618.047798").
_LOG_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_SEVERITIES = b"IWEF"
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called"


def quiet_tensorflow():
    """Sets the logging environment and hooks TensorFlow's import (see above).

    Does nothing to a TensorFlow already imported, and nothing more when
    called again.
    """
    os.environ.setdefault(LEVEL_VARIABLE, DEFAULT_LEVEL)
    level = _level()
    if level == 0 or "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImportFinder())


@contextlib.contextmanager
def grain_read_ahead_warning_hidden():
    """Hides grain's "prefetch_buffer_size=8 is smaller than num_threads=16".

    KerasHub's `fit` bounds grain's read-ahead to 8 batches on purpose (so
    Keras's batch-spec probe preprocesses 10 batches, not 45) and grain
    then warns, through absl's Python logger, on every `fit`: a warning the
    user did not cause and cannot act on. Other absl messages pass.
    """
    logger = logging.getLogger("absl")
    hide = _DropMessages("prefetch_buffer_size=")
    logger.addFilter(hide)
    try:
        yield
    finally:
        logger.removeFilter(hide)


class _DropMessages(logging.Filter):
    def __init__(self, prefix):
        super().__init__()
        self._prefix = prefix

    def filter(self, record):
        return not record.getMessage().startswith(self._prefix)


def _level():
    """`TF_CPP_MIN_LOG_LEVEL` as TensorFlow reads it: an int, else 0."""
    try:
        return max(0, int(os.environ.get(LEVEL_VARIABLE, "0")))
    except ValueError:
        return 0


def is_hidden(line, level):
    """Whether TensorFlow's level `level` would hide this stderr line (bytes)."""
    if level >= 1 and line.startswith(_ABSL_NOTICE):
        return True
    match = _LOG_LINE.match(line)
    return bool(match) and _SEVERITIES.index(match.group(1)) < level


class _QuietImportFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` with the other finders and filters its import."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        # Asked by the import itself or by a mere `importlib.util.find_spec`
        # (Keras and KerasHub ask whether TensorFlow is installed), so the
        # hook stays until a loader really runs.
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


class _QuietLoader(importlib.abc.Loader):
    """Runs the wrapped loader with stderr filtered, then steps aside."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # TensorFlow is imported once: the hook's work ends here.
        sys.meta_path[:] = [
            f for f in sys.meta_path if not isinstance(f, _QuietImportFinder)
        ]
        # The module keeps the real loader (pkgutil and resources ask it).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        stderr = _FilteredStderr(_level())
        stderr.start()
        try:
            self._loader.exec_module(module)
        finally:
            stderr.stop()


class _FilteredStderr:
    """File descriptor 2 sent to a temporary file, then written back filtered."""

    def __init__(self, level):
        self._level = level
        self._saved = None
        self._capture = None

    def start(self):
        try:
            saved = os.dup(2)
        except OSError:
            return  # no stderr to protect
        _flush_python_stderr()
        self._capture = tempfile.TemporaryFile()
        self._saved = saved
        os.dup2(self._capture.fileno(), 2)

    def stop(self):
        if self._saved is None:
            return
        _flush_python_stderr()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        with self._capture as capture:
            capture.seek(0)
            lines = capture.read().splitlines(keepends=True)
        kept = b"".join(line for line in lines if not is_hidden(line, self._level))
        while kept:
            kept = kept[os.write(2, kept) :]


def _flush_python_stderr():
    # Python's buffered writes belong on whichever side of the switch they
    # were made.
    if sys.stderr is not None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
