"""Where a hub-named tokenizer or text encoder comes from: local first, the hub only when it answers.

A hub name (``roberta-base``) is looked up locally first (the Hugging Face cache); only when it
is not there is the hub asked, and only after deciding within :data:`HUB_PROBE_TIMEOUT_S` that
it can be reached (never with ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``). An offline
robot therefore fails at once with :class:`TextEncoderUnavailable`, which names the remedy,
instead of after the hub client's ~50 s of retries.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# How long a hub-named tokenizer that is not cached may wait to learn whether the hub can be
# reached at all. Short, so that an offline robot fails at start-up in about a second.
HUB_PROBE_TIMEOUT_S = 1.0
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE_VALUES = {"1", "on", "yes", "true"}
# A Hugging Face repo id: "name" or "namespace/name" (no leading dot or slash).
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?")


def hub_endpoint() -> str:
    """The hub URL the Hugging Face client uses (``HF_ENDPOINT``, read when it was imported)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except (ImportError, AttributeError):
        return os.environ.get("HF_ENDPOINT", DEFAULT_HUB_ENDPOINT).rstrip("/")


def hub_cache_dir() -> str:
    """The Hugging Face cache the client reads (``HF_HUB_CACHE`` / ``HF_HOME``), for messages."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        return os.environ.get("HF_HUB_CACHE", "~/.cache/huggingface/hub")


def hub_offline_reason() -> Optional[str]:
    """Why the hub must not be contacted (offline mode), or None.

    The environment is read now, and the client's own flag (fixed at its import) is honoured
    too: either one makes the client refuse, so asking it would only produce a worse error.
    """
    for var in _OFFLINE_VARS:
        value = os.environ.get(var, "").strip()
        if value.lower() in _TRUE_VALUES:
            return f"{var}={value} is set"
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "offline mode was on when huggingface_hub was imported (HF_HUB_OFFLINE)"
    except (ImportError, AttributeError):
        pass
    return None


def _proxy_for(url: str) -> Optional[tuple[str, int]]:
    """(host, port) of the proxy the client would use for ``url``, or None for a direct line:
    behind a proxy, the proxy is what has to answer."""
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if not proxy_parts.hostname:
        return None
    return proxy_parts.hostname, proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)


def probe_hub(endpoint: Optional[str] = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> Optional[str]:
    """None when a TCP connection to the hub (or its proxy) opens within ``timeout`` seconds,
    else why not.

    The attempt runs in a daemon thread joined with ``timeout``, so a name lookup that hangs
    (a robot with a dead DNS server) is bounded as well as the connection itself.
    """
    endpoint = endpoint or hub_endpoint()
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return f"the hub endpoint {endpoint!r} is not a URL (HF_ENDPOINT)"
    host, port = _proxy_for(endpoint) or (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    outcome: list[Optional[str]] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=attempt, name="toist-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"no connection to {host}:{port} within {timeout:g} s"
    return None if outcome[0] is None else f"cannot connect to {host}:{port} ({outcome[0]})"


def _remedy(name: str, checkpoint: Optional[str]) -> str:
    pth = checkpoint or "<checkpoint.pth>"
    target = f"{Path(checkpoint).stem if checkpoint else 'model'}_dir"
    return (f"Remedy: on a machine with internet run `toist export {pth} {target}/ --text-encoder {name}` "
            f"(the model directory carries the tokenizer), copy {target}/ to this machine and load it "
            f"(checkpoint:={target} for the node); or give a local directory holding the {name} tokenizer "
            f"files: text_encoder=<dir> (API), --text-encoder <dir> (CLI), text_encoder:=<dir> (ROS node)")


class TextEncoderUnavailable(OSError):
    """A hub-named tokenizer or text encoder is not on this machine and the hub cannot be asked.

    ``what``: "tokenizer" or "text encoder weights"; ``name``: the hub name; ``looked``: the
    places searched; ``reason``: why the hub was not asked; ``checkpoint``: the file being
    loaded, if any (it goes into the ``toist export`` recipe).
    """

    def __init__(self, what: str, name: str, looked: Sequence[str], reason: str,
                 checkpoint: Optional[str] = None) -> None:
        self.what, self.name, self.looked, self.reason, self.checkpoint = what, name, tuple(looked), reason, checkpoint
        super().__init__(f"cannot load the {what} {name!r}: not found locally (looked in: {'; '.join(self.looked)}) "
                         f"and the hub was not asked: {reason}. {_remedy(name, checkpoint)}")

    def for_checkpoint(self, checkpoint: str) -> "TextEncoderUnavailable":
        """The same error with the recipe naming ``checkpoint``."""
        return TextEncoderUnavailable(self.what, self.name, self.looked, self.reason, str(checkpoint))


@dataclass(frozen=True)
class Fetched:
    """Something ``from_pretrained`` returned and where it came from (for the load log line)."""

    value: Any
    origin: str


def local_path(name_or_dir) -> Path:
    """The local path a tokenizer / text-encoder setting names, ``~`` expanded: the one spelling
    every reader of such a setting uses, so that none of them looks at a literal ``~`` folder."""
    return Path(str(name_or_dir)).expanduser()


def _is_hub_name(source: str) -> bool:
    return _HUB_ID.fullmatch(source) is not None and not local_path(source).exists()


def fetch_pretrained(loader: Callable[..., Any], name_or_dir: str, what: str) -> Fetched:
    """``loader(source, local_files_only=...)`` from a local directory, the Hugging Face cache,
    or (only when neither has it and the hub answers) the hub.

    Raises :class:`TextEncoderUnavailable` in about :data:`HUB_PROBE_TIMEOUT_S` when a hub name
    is not cached and the hub is offline or unreachable, ``FileNotFoundError`` for a path that
    does not exist, and ``OSError`` naming the directory when its files cannot be read.
    """
    source = str(name_or_dir)
    local = local_path(source)
    if local.is_dir():
        try:
            return Fetched(loader(str(local), local_files_only=True), f"local directory {local}")
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot load the {what} from the local directory {local}: {exc}") from exc
    if not _is_hub_name(source):
        found = "is not a directory" if local.exists() else "does not exist"
        raise FileNotFoundError(f"cannot load the {what} {source!r}: {local.absolute()} {found} and it is not a "
                                f"Hugging Face model name; give a directory holding the {what} files")
    cache = hub_cache_dir()
    try:
        return Fetched(loader(source, local_files_only=True), f"Hugging Face cache ({cache})")
    except (OSError, ValueError):
        pass  # not cached: the hub is the only place left
    endpoint = hub_endpoint()
    reason = hub_offline_reason() or probe_hub(endpoint)
    looked = [f"the Hugging Face cache {cache}", f"no directory {local.absolute()}"]
    if reason is not None:
        raise TextEncoderUnavailable(what, source, looked, reason)
    logger.info("%s %r is not cached locally: downloading it from %s", what, source, endpoint)
    try:
        return Fetched(loader(source), f"Hugging Face hub ({endpoint}; now cached in {cache})")
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load the {what} {source!r} from the hub {endpoint}: {str(exc).rstrip('. ')}. "
                      f"{_remedy(source, None)}") from exc


__all__ = ["DEFAULT_HUB_ENDPOINT", "Fetched", "HUB_PROBE_TIMEOUT_S", "TextEncoderUnavailable", "fetch_pretrained",
           "hub_cache_dir", "hub_endpoint", "hub_offline_reason", "local_path", "probe_hub"]
