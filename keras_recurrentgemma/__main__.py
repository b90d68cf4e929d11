"""`python -m keras_recurrentgemma`: see `keras_recurrentgemma.cli`.

`python -m keras_recurrentgemma export ...` goes to
`keras_recurrentgemma.export.cli` instead.
"""

import sys


def _main():
    # A random or byte-fallback token can decode to text that a non-UTF-8
    # terminal cannot show; print a replacement character, not a traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if sys.argv[1:2] == ["export"]:
        from keras_recurrentgemma.export.cli import main

        return main(sys.argv[2:])
    from keras_recurrentgemma.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(_main())
