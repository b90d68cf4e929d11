"""pyproject.toml lists its packages by hand (presets/ installs as
`keras_recurrentgemma.presets`), so a new subpackage must be added there."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "keras_recurrentgemma").rglob("__init__.py")
    }
    assert found | {"keras_recurrentgemma.presets"} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"keras_recurrentgemma.presets": "presets"}
    patterns = setuptools["package-data"]["keras_recurrentgemma.presets"]
    shipped = [
        p.relative_to(ROOT / "presets")
        for p in (ROOT / "presets").rglob("*")
        # Files inside a preset folder; presets/README.md documents the repo.
        if p.is_file() and p.parent != ROOT / "presets" and "__pycache__" not in p.parts
    ]
    assert shipped
    for path in shipped:
        assert any(path.match(pattern) for pattern in patterns), path
