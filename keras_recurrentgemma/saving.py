"""Saving a preset so that an interrupted save loses nothing.

KerasHub's `save_to_preset` writes its files one by one into the target
directory, so a save interrupted halfway (Ctrl-C, a full disk, a Kaggle
session that times out) leaves a directory that is neither the old preset
nor the new one. Here every file is written into a temporary sibling
directory first, which then takes the target's place.
"""

import contextlib
import os
import shutil
import tempfile

# Names that mark a directory as a preset (what KerasHub's saver writes).
PRESET_FILES = (
    "config.json",
    "metadata.json",
    "task.json",
    "preprocessor.json",
    "tokenizer.json",
    "audio_converter.json",
    "image_converter.json",
    "video_converter.json",
)


def _is_preset_file(name):
    return name in PRESET_FILES or name.endswith((".weights.h5", ".weights.json"))


def _is_backbone_weights(name):
    # `model.weights.h5`, or a sharded save's `model.weights.json` index and
    # its `model_00000.weights.h5` shards.
    return name.startswith("model") and name.endswith((".weights.h5", ".weights.json"))


def _check_target(preset_dir):
    if os.path.exists(preset_dir) and not os.path.isdir(preset_dir):
        raise ValueError(
            f"Cannot save a preset to {preset_dir!r}: it is a file, not a directory."
        )
    if os.path.isdir(preset_dir):
        names = os.listdir(preset_dir)
        if names and not any(_is_preset_file(name) for name in names):
            # Replacing it would mean moving someone's unrelated files.
            raise ValueError(
                f"Cannot save a preset to {preset_dir!r}: the directory holds "
                f"other files ({', '.join(sorted(names)[:5])}) and no preset. "
                "Save into a new or empty directory, or into an existing preset."
            )


def _keep_other_files(old_dir, new_dir):
    """Links (or copies) into `new_dir` every file of `old_dir` not rewritten.

    This is what saving into an existing directory does in KerasHub, file by
    file: `tokenizer.save_to_preset(d)` then `backbone.save_to_preset(d)`
    leaves both, and a README or LoRA file beside the preset stays. One
    exception: if the new save wrote backbone weights, none of the old ones
    are kept, since a stale shard index would be read instead of the new
    `model.weights.h5`.
    """
    new_has_weights = any(_is_backbone_weights(n) for n in os.listdir(new_dir))
    for root, dirs, files in os.walk(old_dir):
        relative = os.path.relpath(root, old_dir)
        target_root = os.path.normpath(os.path.join(new_dir, relative))
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            if relative == "." and new_has_weights and _is_backbone_weights(name):
                continue
            target = os.path.join(target_root, name)
            if os.path.lexists(target):
                continue  # rewritten by the new save
            os.makedirs(target_root, exist_ok=True)
            _link_or_copy(os.path.join(root, name), target)


def _link_or_copy(source, target):
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextlib.contextmanager
def atomic_preset_dir(preset_dir):
    """Yields a temporary directory that replaces `preset_dir` on success.

    Save every file of the preset into the yielded directory. If the block
    raises, or is interrupted, the temporary directory is removed and
    `preset_dir` is untouched. On success the old directory (if any) is
    moved aside, the new one renamed into its place, and the old one
    deleted. Only a process killed outright can leave the temporary or the
    moved-aside directory behind (`.<name>.saving-*` or `.<name>.old-*`
    next to `preset_dir`); the preset itself is then either the old one or
    the new one, or, between the two renames, in the `.old-*` directory.

    Raises:
        ValueError: if `preset_dir` is a file, or a non-empty directory that
            holds no preset.
    """
    preset_dir = os.path.abspath(os.path.expanduser(os.fspath(preset_dir)))
    _check_target(preset_dir)
    parent, name = os.path.split(preset_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    # mkdtemp makes it private (0700); a saved preset gets the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    old = moved = None
    try:
        yield staging
        if os.path.isdir(preset_dir):
            _keep_other_files(preset_dir, staging)
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            moved = os.path.join(old, name)
            os.rename(preset_dir, moved)
        os.rename(staging, preset_dir)
    except BaseException:
        if moved is not None and os.path.isdir(moved):
            if not os.path.exists(preset_dir):
                os.rename(moved, preset_dir)
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
