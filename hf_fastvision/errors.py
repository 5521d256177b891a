"""Every error the library raises on bad input, in one place.

Each message says what went wrong *and* what to do about it; callers pass the facts, the wording lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "FastVisionError",
    "ModelNotFoundError",
    "NotAVisionModelError",
    "ConflictingOptionsError",
    "CorruptCheckpointError",
    "HubUnreachableError",
    "CheckpointConfigError",
    "CheckpointMismatchError",
    "MissingDependencyError",
    "FeatureNotAvailableError",
    "ImageSpanTruncationError",
    "UnsafeDestinationError",
    "ManifestMismatchError",
    "HubError",
    "InvalidRepoIdError",
    "RefusedPushError",
    "NotA4bitCheckpointError",
    "HubOperationError",
    "MissingTokenError",
    "InvalidArgumentError",
]


class FastVisionError(Exception):
    """Base class of hf_fastvision's own errors."""


class ModelNotFoundError(FastVisionError, OSError):
    """The id or folder names nothing we can load."""

    @classmethod
    def missing_folder(cls, path: str, close: Sequence[str] = (), where: str = "") -> ModelNotFoundError:
        hint = f" Close matches in {where!r}: {', '.join(repr(c) for c in close)}." if close else ""
        return cls(
            f"Local folder {path!r} does not exist.{hint} Check the path, or pass a Hub id such as "
            "'Qwen/Qwen2.5-VL-7B-Instruct'."
        )

    @classmethod
    def is_a_file(cls, path: str, folder: str) -> ModelNotFoundError:
        return cls(
            f"{path!r} is a file, not a model folder. Pass the folder that holds it, {folder!r} (the one with "
            "config.json and the *.safetensors weights)."
        )

    @classmethod
    def not_a_checkpoint(cls, path: str) -> ModelNotFoundError:
        return cls(
            f"Folder {path!r} has no config.json, so it is not a saved model. Point to the folder that "
            "`save_pretrained` wrote (it holds config.json and *.safetensors)."
        )

    @classmethod
    def no_weights(cls, folder: str, files: Sequence[str]) -> ModelNotFoundError:
        held = ", ".join(files[:12]) + (f" and {len(files) - 12} more" if len(files) > 12 else "") if files else "nothing"
        return cls(
            f"Folder {folder!r} holds a config without weights: no model.safetensors, model.safetensors.index.json or "
            f"pytorch_model.bin (it holds {held}). Point to the folder that holds the weights too, or save the model "
            "there with `model.save_pretrained(folder)` (a config or processor save alone writes no weights)."
        )

    @classmethod
    def invalid_id(cls, name: str, detail: str) -> ModelNotFoundError:
        return cls(
            f"{name!r} is neither an existing local folder nor a valid Hub id ({detail}). Pass a Hub id of the form "
            "'org/name' (letters, digits, '-', '_', '.'), or the path of a saved model folder."
        )

    @classmethod
    def unknown_id(
        cls, name: str, offline: bool, detail: str = "", local_files_only: bool = False, close: Sequence[str] = ()
    ) -> ModelNotFoundError:
        if offline:
            fix = (
                "HF_HUB_OFFLINE=1 is set and the model is not in the local Hugging Face cache: run once with "
                "network access to download it, pass a local folder, or check the id's spelling."
            )
        elif local_files_only:
            fix = (
                "local_files_only=True and the model is not in the local Hugging Face cache: drop local_files_only "
                "to download it, pass a local folder, or check the id's spelling."
            )
        else:
            fix = "Check the spelling and that the repo exists; for a private or gated repo pass `token=`."
        local = f" It is no local folder either; close local names: {', '.join(repr(c) for c in close)}." if close else ""
        return cls(f"Cannot find model {name!r}. {fix}{local}" + (f" ({detail})" if detail else ""))

    @classmethod
    def source_not_cached(cls, requested: str, source: str, requested_cached: bool) -> ModelNotFoundError:
        if requested_cached:
            way = (
                f"Load {source!r} once with network access so it is cached, or load the cached 4-bit repo as it "
                "is: pass use_exact_model_name=True and keep the default load_in_4bit=True."
            )
        else:
            way = f"Neither is cached: load {source!r} once with network access, or pass a local folder."
        return cls(
            f"16-bit loading (load_in_4bit=False / load_in_16bit=True) of the 4-bit repo {requested!r} loads its "
            f"16-bit source {source!r}, which is not in the local Hugging Face cache (HF_HUB_OFFLINE=1 is set). {way}"
        )


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
    """A weight file is truncated or unreadable, or a sharded checkpoint's index is broken or names absent shards."""

    def __init__(self, path: str, detail: str, fix: str = ""):
        super().__init__(
            f"Checkpoint file {path!r} is corrupt or incomplete ({detail}). "
            + (
                fix
                or "Delete it and download it again (e.g. `from_pretrained(..., force_download=True)` or "
                "`hf download --force`), or save the model again."
            )
        )

    @classmethod
    def missing_shards(cls, index: str, folder: str, missing: Sequence[str]) -> CorruptCheckpointError:
        shown = ", ".join(repr(m) for m in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        return cls(
            index,
            f"it names {len(missing)} shard file(s) that are not in {folder!r}: {shown}",
            "The download or copy is incomplete: fetch the missing shard(s) again (`hf download REPO --local-dir "
            "FOLDER`, or `from_pretrained(..., force_download=True)`), or save the model again.",
        )


class HubUnreachableError(FastVisionError, ConnectionError):
    """The Hub could not be reached (connection refused, DNS, timeout, proxy): nothing says the id is wrong."""

    def __init__(self, name: str, endpoint: str, detail: str):
        super().__init__(
            f"Could not load {name!r}: could not reach the Hub ({endpoint}: {detail}). Check the connection / "
            "HF_ENDPOINT (and any proxy), or set HF_HUB_OFFLINE=1 to use the models in the local cache."
        )


class CheckpointConfigError(FastVisionError, ValueError):
    """A checkpoint's config.json cannot be read, or names an architecture this transformers cannot build."""

    @classmethod
    def invalid_json(cls, path: str, line: int, column: int, message: str) -> CheckpointConfigError:
        return cls(
            f"{path!r} is not valid JSON: {message} at line {line}, column {column}. Fix the file there (a "
            "hand edit?), or save / download the model again."
        )

    @classmethod
    def not_an_object(cls, path: str, found: str) -> CheckpointConfigError:
        return cls(
            f"{path!r} holds a JSON {found}, not an object of config values. Save / download the model again, or "
            "write the config with `config.save_pretrained(folder)`."
        )

    @classmethod
    def no_model_type(cls, path: str) -> CheckpointConfigError:
        return cls(
            f"{path!r} has no `model_type` key, so transformers cannot tell which architecture it describes. Add the "
            "checkpoint's model_type (e.g. \"model_type\": \"qwen2_5_vl\"), or save the config again with "
            "`config.save_pretrained(folder)`, which writes it."
        )

    @classmethod
    def unknown_model_type(
        cls, name: str, model_type: str, close: Sequence[str], version: str
    ) -> CheckpointConfigError:
        near = f" Close known types: {', '.join(repr(c) for c in close)} (a typo in config.json?)." if close else ""
        return cls(
            f"{name!r} has model_type {model_type!r}, which transformers {version} does not know.{near} Upgrade "
            "transformers (`pip install -U transformers`) if the architecture is newer than this version, or pass "
            "trust_remote_code=True for a repo that ships its own modeling code."
        )

    @classmethod
    def remote_code_needed(cls, name: str, classes: Sequence[str]) -> CheckpointConfigError:
        return cls(
            f"{name!r} is built by code of its own ({', '.join(classes)} in its config's auto_map), not by "
            "transformers. Pass trust_remote_code=True (runs code from the repo: read it first) to load it."
        )

    @classmethod
    def remote_code_missing(cls, name: str, folder: str, files: Sequence[str]) -> CheckpointConfigError:
        return cls(
            f"{name!r} needs its own modeling code (trust_remote_code=True), but {', '.join(repr(f) for f in files)} "
            f"named in config.json's auto_map is not in {folder!r}. Copy the .py files of the original repo into the "
            "folder (a `save_pretrained` of a remote-code model may leave them out), or download the repo again."
        )

    @classmethod
    def rejected(cls, path: str, version: str, detail: str) -> CheckpointConfigError:
        return cls(
            f"transformers {version} could not build a config from {path!r} ({detail}). Fix the value it names in "
            "config.json, or upgrade transformers if the file comes from a newer version."
        )


class CheckpointMismatchError(FastVisionError, ValueError):
    """The checkpoint's tensors do not fit the model its config.json describes (found before any weight is read)."""

    @classmethod
    def wrong_shapes(cls, folder: str, mismatches: Sequence[tuple[str, str, str, str, str]]) -> CheckpointMismatchError:
        """`mismatches`: (model parameter, checkpoint key, file, expected shape, found shape and dtype)."""
        shown = "; ".join(
            f"{param} (checkpoint key {key!r} in {file}): expected {expected}, found {found}"
            for param, key, file, expected, found in mismatches[:5]
        )
        more = f" and {len(mismatches) - 5} more" if len(mismatches) > 5 else ""
        return cls(
            f"The checkpoint in {folder!r} does not match its config.json: {len(mismatches)} tensor(s) have another "
            f"shape than the model expects: {shown}{more}. The weights come from another model size or the config "
            "was edited after saving: use the config.json saved with these weights, or pass "
            "ignore_mismatched_sizes=True to re-initialise these tensors randomly (they then need training)."
        )

    @classmethod
    def missing_tensors(cls, folder: str, missing: Sequence[str], modules: Sequence[str]) -> CheckpointMismatchError:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        return cls(
            f"The checkpoint in {folder!r} lacks {len(missing)} tensor(s) the model needs: {shown}. They would be "
            "initialised randomly. Use a complete checkpoint (an interrupted save or download?), or, to train them "
            f"from scratch on purpose, pass init_missing={tuple(modules)!r}."
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


class UnsafeDestinationError(FastVisionError, FileExistsError):
    """A save was refused before anything was written: the destination is protected or holds files not ours."""

    @classmethod
    def empty(cls) -> UnsafeDestinationError:
        return cls("The save destination is empty. Name a new folder to save into, e.g. 'outputs/lora_model'.")

    @classmethod
    def protected(cls, path: str, what: str) -> UnsafeDestinationError:
        return cls(
            f"Refusing to save into {path!r}: it is {what}, and a save replaces its folder. Name a new subfolder "
            "instead, e.g. 'outputs/lora_model'."
        )

    @classmethod
    def is_file(cls, path: str) -> UnsafeDestinationError:
        return cls(f"Cannot save into {path!r}: it is a file, not a folder. Name a folder to save into.")

    @classmethod
    def clash(cls, path: str, names: list[str]) -> UnsafeDestinationError:
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        return cls(
            f"Refusing to save into {path!r}: it already holds {shown}, which hf_fastvision did not write. Save "
            "into another folder, or pass overwrite=True (CLI: --force) to replace just those files; nothing else "
            "in the folder is touched either way."
        )

    @classmethod
    def locked(cls, path: str) -> UnsafeDestinationError:
        return cls(
            f"Another process is saving into {path!r} right now. Wait for it to finish, or save elsewhere."
        )

    @classmethod
    def nothing_written(cls, path: str) -> UnsafeDestinationError:
        return cls(f"The save into {path!r} produced no files; nothing was changed there. This is a bug: report it.")


class ManifestMismatchError(FastVisionError, OSError):
    """A folder saved by hf_fastvision no longer holds the files its manifest lists."""

    def __init__(self, path: str, missing: list[str], resized: list[str]):
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:8])}")
        if resized:
            parts.append(f"changed size {', '.join(resized[:8])}")
        super().__init__(
            f"The save in {path!r} is incomplete or was edited after saving ({'; '.join(parts)}, per its "
            ".hf_fastvision_save.json). Save the model again, or restore the files; delete .hf_fastvision_save.json "
            "to load the folder as it is."
        )


class HubError(FastVisionError):
    """A hub operation was refused or failed. Its message never contains a token."""


class InvalidRepoIdError(HubError, ValueError):
    """The repo id is not one the Hub accepts (checked before any work)."""


class RefusedPushError(HubError, PermissionError):
    """Publishing would mislabel a model or overwrite a different one (`force=True` overrides), or the token may
    not write to the target namespace (nothing overrides that)."""

    @classmethod
    def read_only_token(cls, repo_id: str, namespace: str) -> RefusedPushError:
        return cls(
            f"Refusing to publish to {repo_id!r}: the Hugging Face token is read-only, so it cannot write to "
            f"{namespace!r}. Create a token with write access at https://huggingface.co/settings/tokens, then run "
            "`hf auth login` or set HF_TOKEN, or pass token=."
        )

    @classmethod
    def no_write_permission(cls, repo_id: str, namespace: str, writable: Iterable[str]) -> RefusedPushError:
        where = sorted(set(writable))
        may = f" (it may write to: {', '.join(where)})" if where else ""
        return cls(
            f"Refusing to publish to {repo_id!r}: the fine-grained Hugging Face token has no write permission "
            f"(repo.write) on {namespace!r}{may}. Grant it write access to {namespace!r} at "
            "https://huggingface.co/settings/tokens, use a write token, or publish under a namespace it may write to."
        )

    @classmethod
    def foreign_namespace(cls, repo_id: str, namespace: str, user: str, orgs: Iterable[str]) -> RefusedPushError:
        allowed = [user, *sorted(set(orgs) - {user})]
        name = repo_id.split("/", 1)[-1]
        return cls(
            f"Refusing to publish to {repo_id!r}: the Hugging Face token belongs to {user!r}, who may not write to "
            f"namespace {namespace!r} (neither the user nor one of their organizations). Publish under one of "
            f"{', '.join(repr(a) for a in allowed)} (e.g. '{user}/{name}'), or log in with a token of a member of "
            f"{namespace!r} (`hf auth login`, HF_TOKEN or token=)."
        )


class NotA4bitCheckpointError(HubError, ValueError):
    """A folder or snapshot is not a bitsandbytes 4-bit checkpoint."""


class HubOperationError(HubError, OSError):
    """The server or the network failed. `status_code` / `error_code` as the server gave them, if any."""

    def __init__(self, message: str, status_code: int | None = None, error_code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code



class MissingTokenError(HubError, PermissionError):
    """Publishing needs a Hugging Face token the Hub accepts: none was found, or the server rejected it."""

    @classmethod
    def no_token(cls, repo_id: str) -> MissingTokenError:
        return cls(
            f"Cannot publish to {repo_id!r}: no Hugging Face token: run `hf auth login` or set HF_TOKEN, or pass "
            "token=. (Nothing was loaded or uploaded.)"
        )

    @classmethod
    def rejected(cls, repo_id: str, source: str) -> MissingTokenError:
        return cls(
            f"Cannot publish to {repo_id!r}: the Hub rejected the Hugging Face token from {source} (invalid or "
            "expired). Create a write token at https://huggingface.co/settings/tokens, then run `hf auth login` or "
            "set HF_TOKEN, or pass token=."
        )


class InvalidArgumentError(FastVisionError, ValueError):
    """An argument of the wrong type or out of range, refused where it enters, before any work is done."""

    STRATEGIES = ("auto", "sequential", "balanced", "balanced_low_0")
    """The placement strategies accelerate accepts as a `device_map` string."""

    @classmethod
    def positive_int(cls, name: str, value: object, example: int) -> InvalidArgumentError:
        return cls(f"{name}={value!r} is not valid: it must be a positive integer. Pass e.g. {name}={example}.")

    @classmethod
    def non_negative_int(cls, name: str, value: object, example: int) -> InvalidArgumentError:
        return cls(f"{name}={value!r} is not valid: it must be an integer >= 0. Pass e.g. {name}={example}.")

    @classmethod
    def lora_rank(cls, value: object) -> InvalidArgumentError:
        return cls(
            f"r={value!r} is not a valid LoRA rank: it must be a positive integer (not a bool, float or string). "
            "Pass e.g. r=8, r=16 or r=32."
        )

    @classmethod
    def lora_alpha(cls, value: object) -> InvalidArgumentError:
        return cls(
            f"lora_alpha={value!r} is not valid: it must be a positive number (LoRA scales its update by "
            "lora_alpha / r). Pass e.g. lora_alpha=16, or twice r."
        )

    @classmethod
    def lora_dropout(cls, value: object) -> InvalidArgumentError:
        return cls(
            f"lora_dropout={value!r} is not valid: it must be a probability in [0, 1). Pass e.g. lora_dropout=0.0 "
            "(no dropout) or lora_dropout=0.05."
        )

    @classmethod
    def choice(cls, name: str, value: object, choices: Iterable[object]) -> InvalidArgumentError:
        return cls(f"{name}={value!r} is not a valid choice. Pass one of: {', '.join(repr(c) for c in choices)}.")

    @classmethod
    def empty_target_modules(cls) -> InvalidArgumentError:
        return cls(
            "target_modules is empty, so LoRA would train nothing. Pass layer names such as ['q_proj', 'v_proj'], "
            "a regex over full module paths, or 'all-linear'; or leave target_modules=None to choose layers with "
            "the finetune_* flags."
        )

    @classmethod
    def unmatched_target_modules(cls, targets: object, linear_names: Iterable[str]) -> InvalidArgumentError:
        names = ", ".join(sorted(set(linear_names))) or "(none)"
        return cls(
            f"target_modules={targets!r} matches no module of this model. Pass names of its linear layers: "
            f"{names}; or a regex over full module paths, or 'all-linear'."
        )

    @classmethod
    def unsupported_target_modules(cls, found: dict[str, str], linear_names: Iterable[str]) -> InvalidArgumentError:
        shown = ", ".join(f"{name} ({kind})" for name, kind in sorted(found.items())[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        names = ", ".join(sorted(set(linear_names))) or "(none)"
        return cls(
            f"target_modules matches modules LoRA cannot wrap: {shown}{more}. LoRA goes on linear, embedding and "
            f"convolution layers: narrow target_modules to the linear layers, e.g. {names}."
        )

    @classmethod
    def bad_regex(cls, name: str, pattern: str, detail: str) -> InvalidArgumentError:
        return cls(
            f"{name} {pattern!r} is not a valid regular expression ({detail}). Fix the pattern; escape literal dots "
            r"and brackets with a backslash (e.g. 'layers\.1\.mlp')."
        )

    @classmethod
    def compute_dtype(cls, value: object, allowed: Iterable[str]) -> InvalidArgumentError:
        return cls(
            f"dtype={value!r} is not supported: the compute dtype must be a 16- or 32-bit floating type. Pass one "
            f"of {', '.join(repr(a) for a in allowed)} (a torch dtype or its name), or 'auto' / None for the default "
            "(bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU)."
        )

    @classmethod
    def storage_dtype(cls, value: object, allowed: Iterable[str]) -> InvalidArgumentError:
        return cls(
            f"quant_storage={value!r} is not supported as the 4-bit storage dtype. Pass one of "
            f"{', '.join(repr(a) for a in allowed)} (a torch dtype or its name): 'uint8' (the default), or the "
            "compute dtype for FSDP."
        )

    @classmethod
    def device_map(cls, value: object, device: object, available: Sequence[str], key: object = None) -> InvalidArgumentError:
        """`device` (the whole map, or its entry at `key`) is not one of the `available` devices."""
        kind = device.split(":")[0].strip().lower() if isinstance(device, str) else None
        present = [d for d in available if d.split(":")[0] == kind]
        gpus = [d for d in available if d.startswith(("cuda", "xpu", "mps"))]
        label = {"cuda": "CUDA", "xpu": "XPU", "mps": "MPS"}.get(kind or "", "")
        if key is not None and not isinstance(key, str):
            why = f"the key {key!r} is not a module name (keys are module paths, '' for the whole model)"
        elif isinstance(device, bool) or not isinstance(device, (int, str)):
            why = f"{device!r} is not a device"
        elif isinstance(device, int) and device < 0:
            why = f"{device} is not a GPU index (they count from 0)"
        elif isinstance(device, int):
            why = f"GPU {device} does not exist: this machine has " + (f"{len(gpus)} GPU(s)" if gpus else "no GPU")
        elif label and not present:
            why = f"{device!r} is not available: this machine has no {label} device"
        elif label:
            why = f"{device!r} does not exist: this machine has {len(present)} {label} device(s)"
        elif kind == "disk":
            why = "'disk' works only as a value inside a dict (offloading some modules)"
        else:
            why = f"{device!r} is not a device or a placement strategy"
        where = f" (at {key!r})" if isinstance(key, str) else ""
        return cls(
            f"device_map={value!r}{where}: {why}. Available devices: {', '.join(available)}. Pass "
            "device_map='auto' (accelerate places the model on what is there), one of the available devices, a "
            f"strategy ({', '.join(repr(s) for s in cls.STRATEGIES)}), or a dict mapping module names to devices "
            "('cpu', 'disk' or a GPU index also work as values)."
        )

    @classmethod
    def shard_size(cls, value: object) -> InvalidArgumentError:
        return cls(
            f"max shard size {value!r} is not valid. Pass a positive number of bytes (e.g. 500000000) or a size "
            "with a unit, KB, MB, GB or TB (e.g. '500MB', '5GB')."
        )

    @classmethod
    def not_a_folder(cls, name: str, path: str) -> InvalidArgumentError:
        return cls(f"{name} {path!r} is an existing file, not a folder. Pass a folder path (created if missing).")

    @staticmethod
    def long_sequence_warning(max_seq_length: int, positions: int) -> str:
        """The warning (not an error) for a max_seq_length past the model's trained positions."""
        return (
            f"max_seq_length={max_seq_length} is longer than the model's {positions} positions "
            f"(max_position_embeddings): positions past {positions} were never trained. Lower max_seq_length to "
            f"{positions} or less, unless the model's RoPE scaling extends it."
        )


# --------------------------------------------------------------------------------------------------- scrubbing
