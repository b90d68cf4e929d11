"""Loading the project's scripts (tools/, examples/) as modules in tests."""

import importlib.util


def load_script(path, name):
    """The module of the Python file `path`, imported under `name`; tools/
    and examples/ are not packages."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
