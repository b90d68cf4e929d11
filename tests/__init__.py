import importlib.util
import sys

# Triton (the torch kernel's compiler) and TensorFlow each carry LLVM; if
# TensorFlow is loaded first, loading Triton aborts the process ("LLVM ERROR:
# inconsistency in registered CommandLine options"). The oracles import
# torch._dynamo, which imports Triton, after KerasHub has imported
# TensorFlow, so Triton is loaded here, before anything else. A process that
# has TensorFlow already (a test's subprocess that imports `tests` late) must
# not load it at all.
if "tensorflow" not in sys.modules and importlib.util.find_spec("triton"):
    import triton  # noqa: F401
