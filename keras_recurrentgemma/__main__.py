"""`python -m keras_recurrentgemma`: see `keras_recurrentgemma.cli`."""

import sys

from keras_recurrentgemma.cli import main

if __name__ == "__main__":
    # A random or byte-fallback token can decode to text that a non-UTF-8
    # terminal cannot show; print a replacement character, not a traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    sys.exit(main())
