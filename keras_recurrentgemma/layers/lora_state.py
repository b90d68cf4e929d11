"""LoRA layers whose weights files keep the factors, so training resumes exactly.

Keras's `Dense.save_own_variables` writes the kernel with LoRA merged in,

    W_saved = W + (alpha / rank) · A B        W: [out, in], A: [out, r], B: [r, in]

and its `load_own_variables` assigns `W_saved` and zeroes `A` and `B`. That is
right for a model shipped for inference, wrong for a training checkpoint: the
resumed run has `A = B = 0`, so both gradients are zero and the adapter never
moves again. `LoRAStateMixin` overrides both methods in our layers:

- saving writes Keras's numbered entries unchanged (`"0"` is still `W_saved`,
  so any reader of a Keras weights file sees the merged model) and, while LoRA
  is on, also `unmerged_kernel` (plus `unmerged_kernel_scale` /
  `unmerged_kernel_zero` for a quantized kernel) and `lora_kernel_a`,
  `lora_kernel_b`: what `model.save_weights`, `ModelCheckpoint` and
  `BackupAndRestore` write;
- loading into a LoRA layer restores `W`, `A` and `B` exactly from those
  entries; loading them into a layer without LoRA takes `W_saved` and ignores
  the rest; a file without them (a preset, a plain Keras file) loads `W_saved`
  and sets `B = 0` but keeps `A`, so the layer computes `W_saved` and LoRA can
  still train (Keras zeroes both).

Whole-model saves are inference artefacts: inside `merged_weights_only()`
(which `RecurrentGemmaBackbone.save_to_preset` uses) only Keras's merged
entries are written. A `.keras` file is written through the same calls as
`save_weights` with nothing to tell them apart, so it also carries the extra
entries; it reloads into a model without LoRA (the config has none), which
takes the merged kernel, as Keras does.
"""

import contextlib
import threading

from keras import ops

FACTORS = ("lora_kernel_a", "lora_kernel_b")
UNMERGED = "unmerged_"
# Entries of Keras's `variable_serialization_spec` that its save merges LoRA
# into; the others (bias, ...) are written unchanged.
MERGED_NAMES = ("kernel", "kernel_scale", "kernel_zero")

_merge_only = threading.local()


@contextlib.contextmanager
def merged_weights_only():
    """Within the block, LoRA layers save only Keras's merged entries."""
    previous = getattr(_merge_only, "on", False)
    _merge_only.on = True
    try:
        yield
    finally:
        _merge_only.on = previous


class LoRAStateMixin:
    """Put before `keras.layers.EinsumDense` in the bases; see the module
    docstring."""

    def _unmerged_variables(self):
        """`(name, variable)` of what Keras's save merges LoRA into."""
        spec = self.variable_serialization_spec[self.quantization_mode]
        found = []
        for name in spec:
            if name not in MERGED_NAMES:
                continue
            # `kernel` is a property that returns the merged value while LoRA
            # is on; Keras keeps the frozen kernel itself in `_kernel`.
            variable = self._kernel if name == "kernel" else getattr(self, name, None)
            if variable is not None:
                found.append((name, variable))
        return found

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if not self.built or not self.lora_enabled or getattr(_merge_only, "on", False):
            return
        for name, variable in self._unmerged_variables():
            store[UNMERGED + name] = variable
        store[FACTORS[0]] = self.lora_kernel_a
        store[FACTORS[1]] = self.lora_kernel_b

    def load_own_variables(self, store):
        keys = list(store.keys())
        extra = [k for k in keys if not k.isdigit()]
        if not extra:
            kept_a = None
            if self.built and self.lora_enabled:
                kept_a = ops.convert_to_numpy(self.lora_kernel_a)
            super().load_own_variables(store)
            if kept_a is not None:
                # Keras zeroed both factors; a zero B keeps `W_saved` exact
                # and the kept A keeps B's gradient alive.
                self.lora_kernel_a.assign(kept_a)
            return
        if not self.lora_enabled:
            # The numbered entries already hold the merged model.
            super().load_own_variables({k: store[k] for k in keys if k.isdigit()})
            return
        targets = [(UNMERGED + name, v) for name, v in self._unmerged_variables()]
        targets += [(FACTORS[0], self.lora_kernel_a), (FACTORS[1], self.lora_kernel_b)]
        missing = [key for key, _ in targets if key not in extra]
        if missing:
            raise ValueError(
                f"Weights of LoRA layer `{self.path}` lack {missing} (found "
                f"{sorted(extra)}): the file is incomplete or from another version."
            )
        values = {key: store[key] for key, _ in targets}
        for key, variable in targets:
            if tuple(values[key].shape) != tuple(variable.shape):
                raise ValueError(
                    f"`{key}` of LoRA layer `{self.path}` has shape "
                    f"{tuple(values[key].shape)} in the file, {tuple(variable.shape)} "
                    "in this model: the file comes from another LoRA rank or size."
                )
        super().load_own_variables(store)
        for key, variable in targets:
            variable.assign(values[key])
