"""Every error the library raises on bad input, in one place.

Each message says what went wrong *and* what to do about it; callers pass the facts, the wording lives here.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "FastVisionError",
    "ModelNotFoundError",
    "NotAVisionModelError",
    "ConflictingOptionsError",
    "CorruptCheckpointError",
    "MissingDependencyError",
    "FeatureNotAvailableError",
    "ImageSpanTruncationError",
    "HubError",
    "InvalidRepoIdError",
    "RefusedPushError",
    "NotA4bitCheckpointError",
    "HubOperationError",
]


class FastVisionError(Exception):
    """Base class of hf_fastvision's own errors."""


class ModelNotFoundError(FastVisionError, OSError):
    """The id or folder names nothing we can load."""

    @classmethod
    def missing_folder(cls, path: str) -> ModelNotFoundError:
        return cls(
            f"Local folder {path!r} does not exist. Check the path, or pass a Hub id such as "
            "'Qwen/Qwen2.5-VL-7B-Instruct'."
        )

    @classmethod
    def not_a_checkpoint(cls, path: str) -> ModelNotFoundError:
        return cls(
            f"Folder {path!r} has no config.json, so it is not a saved model. Point to the folder that "
            "`save_pretrained` wrote (it holds config.json and *.safetensors)."
        )

    @classmethod
    def unknown_id(cls, name: str, offline: bool, detail: str = "") -> ModelNotFoundError:
        if offline:
            fix = (
                "HF_HUB_OFFLINE=1 is set and the model is not in the local Hugging Face cache: run once with "
                "network access to download it, pass a local folder, or check the id's spelling."
            )
        else:
            fix = "Check the spelling and that the repo exists; for a private or gated repo pass `token=`."
        return cls(f"Cannot find model {name!r}. {fix}" + (f" ({detail})" if detail else ""))


class NotAVisionModelError(FastVisionError, ValueError):
    """The checkpoint is a model transformers knows, but not an image-text-to-text one."""

    def __init__(self, name: str, model_type: str, suggestion: str):
        super().__init__(
            f"{name!r} is a {model_type!r} model, which takes no images: hf_fastvision loads vision-language "
            f"models only. Load it with transformers' `{suggestion}.from_pretrained(...)` instead."
        )


class ConflictingOptionsError(FastVisionError, ValueError):
    """Options that cannot hold together."""

    def __init__(self, given: Iterable[str], fix: str):
        super().__init__(f"Conflicting options {', '.join(sorted(given))}: {fix}")


class CorruptCheckpointError(FastVisionError, OSError):
    """A weight file is truncated or unreadable."""

    def __init__(self, path: str, detail: str):
        super().__init__(
            f"Checkpoint file {path!r} is corrupt or incomplete ({detail}). Delete it and download it again "
            "(e.g. `from_pretrained(..., force_download=True)` or `hf download --force`), or save the model again."
        )


class MissingDependencyError(FastVisionError, ImportError):
    """An optional package needed for the requested feature is not installed."""

    def __init__(self, package: str, feature: str, pip_name: str | None = None):
        super().__init__(
            f"{feature} needs the `{package}` package, which is not installed. Install it with "
            f"`pip install {pip_name or package}`, or load in 16-bit with `load_in_4bit=False`."
        )


class FeatureNotAvailableError(FastVisionError, NotImplementedError):
    """A documented option whose implementation has not landed yet."""

    def __init__(self, option: str, fix: str):
        super().__init__(f"{option} is not available yet in hf_fastvision. {fix}")


class ImageSpanTruncationError(FastVisionError, ValueError):
    """Truncating to max_seq_length would cut through an image's tokens."""

    def __init__(self, max_seq_length: int, needed: int):
        super().__init__(
            f"A sample needs {needed} tokens up to the end of its last image, more than max_seq_length="
            f"{max_seq_length}; cutting would split an image's token span. Raise max_seq_length, or lower the "
            "image resolution with `max_image_size=` (fewer image tokens)."
        )


class HubError(FastVisionError):
    """A hub operation was refused or failed. Its message never contains a token."""


class InvalidRepoIdError(HubError, ValueError):
    """The repo id is not one the Hub accepts (checked before any work)."""


class RefusedPushError(HubError, PermissionError):
    """Publishing would mislabel a model or overwrite a different one; `force=True` overrides."""


class NotA4bitCheckpointError(HubError, ValueError):
    """A folder or snapshot is not a bitsandbytes 4-bit checkpoint."""


class HubOperationError(HubError, OSError):
    """The server or the network failed. `status_code` / `error_code` as the server gave them, if any."""

    def __init__(self, message: str, status_code: int | None = None, error_code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code


# --------------------------------------------------------------------------------------------------- scrubbing
