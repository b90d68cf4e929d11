"""The examples a Keras user runs: `examples/*.py` and the two notebooks.

Each script's `main` runs here with small settings, and its results are
checked: text that continues its prompt, a conversation that alternates,
a LoRA fine-tune whose loss goes down and whose saved LoRA weights and
merged preset give the fine-tuned model's logits.

The notebooks run top to bottom in a real Jupyter kernel (nbclient driving
ipykernel's `python3`, this interpreter) with this process's Keras backend,
each in its own temporary directory, and must finish without an error; the
LoRA notebook must draw its loss curve as a PNG and report, in its last
cell's JSON line, a loss that went down. They start when this module does
and run in the background while the scripts run here: most of the time is
compilation, which is single-threaded, so on two cores the kernels' work
overlaps ours instead of adding to it.
"""

import asyncio
import concurrent.futures
import importlib.util
import json
import os
import pathlib

import keras
import numpy as np
import pytest

from tests.scripts import load_script
from tests.tolerances import LORA_MERGED
from tests.tolerances import SELF_CONSISTENCY

# The examples call library code that the other test files check on every
# backend; what is new here is the scripts and notebooks themselves. They
# cost 3 min of XLA compilation per backend on JAX and TensorFlow (2 cores),
# so they run on torch by default and on every backend with `--run_large`.
pytestmark = [] if keras.config.backend() == "torch" else [pytest.mark.large]

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = ("generate", "lora_finetune")
CELL_TIMEOUT_S = 300
NOTEBOOKS_TIMEOUT_S = 900


def load_example(name):
    """The module `examples/{name}.py`."""
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


def kernel_env():
    env = dict(os.environ)
    env["KERAS_BACKEND"] = keras.config.backend()
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # Two kernels and this process share the machine: torch's worker threads
    # spin while they wait, and oversubscribed they make torch several times
    # slower; a tiny model gains nothing from them.
    env["OMP_NUM_THREADS"] = "1"
    # The kernel runs in a temporary directory: make it import this checkout.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    return env


def execute_notebooks(names, directory):
    """Runs the notebooks concurrently; returns `{name: notebook or error}`."""
    import nbclient
    import nbformat

    async def execute(name):
        notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
        workdir = directory / name
        workdir.mkdir()
        client = nbclient.NotebookClient(
            notebook,
            kernel_name="python3",
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(workdir)}},
        )
        await client.async_execute(env=kernel_env())
        return notebook

    async def execute_all():
        return await asyncio.gather(
            *(execute(name) for name in names), return_exceptions=True
        )

    return dict(zip(names, asyncio.run(execute_all()), strict=True))


@pytest.fixture(scope="module", autouse=True)
def notebook_runs(request, tmp_path_factory):
    """Starts the notebooks this session will test; yields a future or None."""
    selected = any(
        item.module is request.module and item.originalname == "test_notebook"
        for item in request.session.items
    )
    have_runner = all(
        importlib.util.find_spec(name) is not None
        for name in ("nbclient", "nbformat", "ipykernel", "matplotlib")
    )
    if not (selected and have_runner):
        yield None
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(
            execute_notebooks, NOTEBOOKS, tmp_path_factory.mktemp("notebooks")
        )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch here uses one thread too while the kernels run (see `kernel_env`)."""
    if keras.config.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, **SELF_CONSISTENCY["float32"])


# --- Scripts --------------------------------------------------------------


def test_generate_script(capsys):
    prompts = ["The function", "A list is"]
    texts = load_example("generate").main(
        ["--prompt", prompts[0], "--prompt", prompts[1]]
        + ["--max-length", "24", "--sampler", "top_k", "--seed", "1"]
    )
    assert len(texts) == 2
    for prompt, text in zip(prompts, texts, strict=True):
        assert text.startswith(prompt)
        assert len(text.split()) > len(prompt.split())
    printed = capsys.readouterr().out
    assert all(text in printed for text in texts)


def test_chat_script_refuses_a_base_model_without_force():
    with pytest.raises(SystemExit, match="not instruction-tuned"):
        load_example("chat").main(["--message", "Hello"])


def test_chat_script(capsys):
    chat = load_example("chat")
    messages = ["What does len() return?", "And for a dict?"]
    too_long = "Explain this. " * 40  # alone more than --max-length tokens
    argv = ["--force", "--max-length", "64"]
    for message in messages + [too_long]:
        argv += ["--message", message]
    turns = chat.main(argv)
    roles = [turn["role"] for turn in turns]
    assert roles == ["user", "model"] * (len(turns) // 2)
    # The first exchange may have been dropped to fit --max-length, and the
    # message that cannot fit is reported and left out.
    assert turns[-2]["content"] == messages[1]
    assert all(isinstance(turn["content"], str) for turn in turns)
    captured = capsys.readouterr()
    assert f"user> {messages[1]}" in captured.out
    assert "error:" in captured.err and "max_length=64" in captured.err


def test_read_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("One line\ncontinued.\n\n\n  Second  one. \n\n")
    assert load_example("lora_finetune").read_paragraphs(path) == [
        "One line continued.",
        "Second one.",
    ]


def test_lora_finetune_script(tmp_path):
    argv = ["--epochs", "2", "--max-length", "24", "--output-dir", str(tmp_path)]
    plot = tmp_path / "loss.png"
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(plot)]
    result = load_example("lora_finetune").main(argv)

    assert result["loss"][-1] < result["loss"][0]
    assert 0 < result["trainable_params"] < 0.02 * result["total_params"]
    for text in (result["before"], result["after"]):
        assert text.startswith("The enable_lora() method")
    # A fresh model with the saved LoRA weights, and the merged preset, are
    # the fine-tuned model.
    close(result["reloaded_logits"], result["logits"])
    # The LoRA model applies its factors unmerged; the preset holds them merged.
    np.testing.assert_allclose(
        result["merged_logits"], result["logits"], **LORA_MERGED["float32"]
    )
    assert os.path.getsize(result["lora_path"]) < 1024 * 1024
    assert os.path.isfile(os.path.join(result["preset_dir"], "model.weights.h5"))
    if "--plot" in argv:
        assert plot.read_bytes().startswith(b"\x89PNG")


# --- Notebooks ------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    """Outputs belong to a run, not to the repository."""
    notebook = json.loads((EXAMPLES / f"{name}.ipynb").read_text())
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def outputs(cell):
    return cell.get("outputs", [])


def stream_text(cell):
    return "".join(
        o.get("text", "") for o in outputs(cell) if o.output_type == "stream"
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook(name, notebook_runs):
    for module in ("nbclient", "nbformat", "ipykernel", "matplotlib"):
        pytest.importorskip(module)
    notebook = notebook_runs.result(timeout=NOTEBOOKS_TIMEOUT_S)[name]
    if isinstance(notebook, Exception):
        raise notebook  # nbclient's CellExecutionError shows the cell and traceback
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    errors = [o for cell in code for o in outputs(cell) if o.output_type == "error"]
    assert not errors

    if name == "generate":
        text = "".join(stream_text(cell) for cell in code)
        # Two samplers, each continuing both prompts.
        assert text.count("The function") >= 2 and text.count("A list is") >= 2
        return

    pngs = [
        o
        for cell in code
        for o in outputs(cell)
        if o.output_type == "display_data" and "image/png" in o.data
    ]
    assert len(pngs) == 1
    summary = json.loads(stream_text(code[-1]).strip().splitlines()[-1])
    assert summary["backend"] == keras.config.backend()
    assert summary["loss"][-1] < summary["loss"][0]
    assert summary["trainable_params"] > 0
    assert summary["lora_reload_max_abs_diff"] <= SELF_CONSISTENCY["float32"]["atol"]
