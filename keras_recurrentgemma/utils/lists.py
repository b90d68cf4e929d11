"""Arguments that take one string or a list of them.

Keras-free on purpose: `serving.py` uses it and must run without Keras.
"""


def one_or_more(value, argument, hint):
    """Returns `value` as a non-empty list; a lone `str` becomes `[value]`.

    Args:
        value: a str, or an iterable of items.
        argument: str. The argument's name, for the error.
        hint: str. What to pass instead, for the error.

    Raises:
        ValueError: `value` is empty, naming `argument`.
    """
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f"`{argument}` is empty; {hint}.")
    return items
