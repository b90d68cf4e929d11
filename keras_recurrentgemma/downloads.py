"""Downloads for `hf://` and `kaggle://` handles, with errors that say what to do.

Both downloaders keep a local cache (`HF_HUB_CACHE`, `KAGGLEHUB_CACHE`) and
answer from it when the files are there: a model downloaded once loads
offline. What they raise when they cannot — no network, no credentials, a
licence not yet accepted — is turned into a `ValueError` that names the
handle and the fix.
"""

import importlib

# What `from_preset` needs from a Hugging Face repository, in any of the
# formats it reads; skips e.g. GGUF or PyTorch `.bin` duplicates.
HF_ALLOW_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.h5",
    "*.model",
    "*.spm",
    "*.md",
    "assets/**",
)


def _strip_scheme(handle, scheme):
    return handle.split("://", 1)[1] if handle.lower().startswith(scheme) else handle


def _import(handle, package, submodule):
    """`package` and its `submodule`, or an ImportError saying that loading
    `handle` needs `package` installed."""
    try:
        module = importlib.import_module(package)
        return module, importlib.import_module(f"{package}.{submodule}")
    except ImportError as e:
        raise ImportError(
            f"Loading {handle} needs `{package}`: pip install {package}"
        ) from e


def huggingface_download(handle):
    """Downloads (or finds in the cache) a Hugging Face repository.

    Args:
        handle: str. `"hf://org/name"`.

    Returns:
        The local snapshot directory.

    Raises:
        ImportError: if `huggingface_hub` is not installed.
        ValueError: for a malformed handle, a missing or gated repository,
            missing credentials, or no network and no cached copy.
    """
    huggingface_hub, errors = _import(handle, "huggingface_hub", "errors")
    repo_id = _strip_scheme(handle, "hf://").strip("/")
    url = f"https://huggingface.co/{repo_id}"
    try:
        return huggingface_hub.snapshot_download(
            repo_id, allow_patterns=list(HF_ALLOW_PATTERNS)
        )
    except errors.HFValidationError as e:
        raise ValueError(
            f"{handle}: not a valid Hugging Face handle; use 'hf://org/name', "
            f"e.g. 'hf://google/recurrentgemma-2b'. ({e})"
        ) from e
    except errors.GatedRepoError as e:
        raise ValueError(
            f"{handle} is gated: accept its licence at {url} while logged in, "
            "then authenticate here with `hf auth login` or by setting HF_TOKEN "
            "to a token of that account."
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise ValueError(
            f"{handle}: no such Hugging Face repository, or it is private and no "
            "valid token was sent. Check the name at "
            f"{url}; if it is private, run `hf auth login` or set HF_TOKEN."
        ) from e
    except errors.RevisionNotFoundError as e:
        raise ValueError(f"{handle}: revision not found ({e}).") from e
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
        raise ValueError(
            f"{handle} is not in the local Hugging Face cache and cannot be "
            "downloaded (no network, or HF_HUB_OFFLINE=1). Download it once on a "
            f"connected machine (`hf download {repo_id}`) and copy the cache "
            "(HF_HUB_CACHE), or pass the local directory to `from_preset`."
        ) from e


def kaggle_download(handle):
    """Downloads (or finds in the cache) a Kaggle model.

    Args:
        handle: str. `"kaggle://owner/model/framework/variation[/version]"`.

    Returns:
        The local directory of the model files.

    Raises:
        ImportError: if `kagglehub` is not installed.
        ValueError: for a malformed handle, missing credentials, a licence
            not yet accepted, a missing model, or no network and no cached
            copy.
    """
    kagglehub, exceptions = _import(handle, "kagglehub", "exceptions")
    import requests

    model = _strip_scheme(handle, "kaggle://").strip("/")
    parts = model.split("/")
    if len(parts) not in (4, 5):
        raise ValueError(
            f"{handle}: a Kaggle model handle is "
            "'kaggle://owner/model/framework/variation[/version]', e.g. "
            "'kaggle://google/recurrentgemma/flax/2b'."
        )
    url = "https://www.kaggle.com/models/" + "/".join(parts[:2])
    credentials = (
        "Set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json (from "
        "kaggle.com > Settings > API) in ~/.kaggle/"
    )
    try:
        return kagglehub.model_download(model)
    except exceptions.UnauthenticatedError as e:
        raise ValueError(f"{handle}: no Kaggle credentials. {credentials}.") from e
    except exceptions.KaggleApiHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise ValueError(
                f"{handle}: Kaggle refused access ({status}). Accept the model's "
                f"licence at {url} with your account, and check your credentials: "
                f"{credentials}."
            ) from e
        if status == 404:
            raise ValueError(
                f"{handle}: no such Kaggle model (404). Check owner, model, "
                f"framework and variation at {url}."
            ) from e
        raise ValueError(f"{handle}: Kaggle download failed ({e}).") from e
    except requests.exceptions.ConnectionError as e:
        raise ValueError(
            f"{handle}: cannot reach Kaggle and it is not in the local kagglehub "
            "cache (KAGGLEHUB_CACHE). Download it once on a connected machine, "
            "or pass the local directory to `from_preset`. A handle with an "
            "explicit version (…/variation/1) is found in the cache without "
            "asking Kaggle for the latest version."
        ) from e
