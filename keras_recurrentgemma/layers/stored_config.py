"""Constructor arguments kept once: as attributes and in `get_config`.

A block layer used to list its arguments three times: in the signature, as
`self.x = x` lines, and again in `get_config`. The last two could drift (an
argument stored but not serialized silently reverts to its default when a
`.keras` file is loaded). A layer that mixes in `StoredConfig` names its
serialized arguments once, in `CONFIG`, and calls `self.store_config(locals())`
after `super().__init__`.
"""


class StoredConfig:
    """Mixin for a Keras layer whose config is exactly the arguments in `CONFIG`."""

    CONFIG = ()

    def store_config(self, arguments):
        """Sets `self.<name>` for every name in `CONFIG` from `arguments`.

        Args:
            arguments: dict. The constructor's `locals()`; names outside
                `CONFIG` (`self`, `kwargs`) are ignored.
        """
        missing = [name for name in self.CONFIG if name not in arguments]
        if missing:
            # A programming error in the layer, not user input.
            raise TypeError(
                f"{type(self).__name__}.CONFIG names {missing}, which are not "
                "constructor arguments."
            )
        for name in self.CONFIG:
            setattr(self, name, arguments[name])

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self.CONFIG})
        return config
