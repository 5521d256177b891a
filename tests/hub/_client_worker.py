"""The client side of the hub tests, in its own process.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it is imported, and the pytest
process imports it early and offline; so everything that talks to the test servers runs here, in a process
started with the right environment (see conftest.ClientWorker). It imports hf_fastvision once and then serves
requests: one JSON line in on stdin (`{"fn": name, "kwargs": {...}}`), one JSON line out on the original stdout
(`{"ok": true, "result": ...}` or `{"ok": false, "error": {"type", "mro", "message"}}`). Everything the library
prints or logs goes to stderr, which the fixture captures in a file (checked for token leaks).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Any

_reply = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # anything written to stdout (also by C code) lands in the captured stderr
sys.stdout = sys.stderr
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

import torch  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from hf_fastvision import AutoFastVisionModel  # noqa: E402
from hf_fastvision import hub  # noqa: E402
from hf_fastvision.quantize import quantize_and_publish, quantize_command, sample_inputs, stable_logits  # noqa: E402

torch.set_num_threads(1)
_MODELS: dict[tuple[str, int], Any] = {}


@contextmanager
def _endpoint(url: str | None):
    old = os.environ.get("HF_ENDPOINT")
    if url:
        os.environ["HF_ENDPOINT"] = url
    try:
        yield
    finally:
        if old is not None:
            os.environ["HF_ENDPOINT"] = old


def _model(src: str, bits: int) -> Any:
    key = (src, bits)
    if key not in _MODELS:
        flag = {"load_in_4bit": True} if bits == 4 else {"load_in_16bit": True}
        _MODELS[key] = AutoFastVisionModel.from_pretrained(src, **flag)
    return _MODELS[key]


def push(
    src: str,
    repo_id: str,
    *,
    bits: int = 4,
    via: str = "push_4bit",
    logits_out: str | None = None,
    with_processor: bool = True,
    config_extra: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load a tiny checkpoint (4- or 16-bit), record its logits, publish it with push_4bit or model.push_to_hub."""
    model = _model(src, bits)
    processor = AutoProcessor.from_pretrained(src)
    for key, value in (config_extra or {}).items():
        setattr(model.config, key, value)
    if logits_out:
        torch.save(stable_logits(model, sample_inputs(processor)), logits_out)
    if via == "push_to_hub":
        hub.attach_push_to_hub(model)
        result = model.push_to_hub(repo_id, processor=processor if with_processor else None, **kwargs)
    else:
        result = hub.push_4bit(model, processor if with_processor else None, repo_id, **kwargs)
    for key in config_extra or {}:
        delattr(model.config, key)
    return {"commit": str(result), "oid": getattr(result, "oid", None), "pr": getattr(result, "pr_revision", None)}


def quantize(src: str, repo_id: str | None, *, logits_out: str | None = None, **kwargs: Any) -> dict[str, Any]:
    result = quantize_and_publish(src, repo_id, progress=True, **kwargs)
    if logits_out:
        torch.save(result.logits, logits_out)
    return result.as_dict()


def cli(argv: list[str]) -> int:
    return quantize_command(argv)


def pull(repo_id: str, *, endpoint: str | None = None, **kwargs: Any) -> dict[str, Any]:
    with _endpoint(endpoint):
        path = hub.pull(repo_id, **kwargs)
    return {"path": str(path), "size": path.size_bytes, "quant_type": path.info.quant_type,
            "kept": list(path.info.kept_modules), "files": list(path.info.files)}


def ping() -> dict[str, Any]:
    import huggingface_hub

    return {"endpoint": hub._endpoint(), "hub": huggingface_hub.__version__, "offline": hub._offline()}


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if request["fn"] == "exit":
            break
        try:
            result = globals()[request["fn"]](**request.get("kwargs", {}))
            reply = {"ok": True, "result": result}
        except BaseException as exc:  # noqa: BLE001 - report everything to the test
            traceback.print_exc()
            reply = {"ok": False, "error": {"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                                            "message": str(exc)}}
        _reply.write(json.dumps(reply, default=str) + "\n")
        _reply.flush()


if __name__ == "__main__":
    main()
