"""Where a source lives: a local file or folder, or a Hub dataset id, told apart before anything is loaded, so
a mistyped local path is "not found" and never a Hub lookup, and an offline Hub fails in about a second.
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
import threading
from typing import Any

from ..errors import MixDataError

def load_dataset_location(location: str, split: str = "train", file_fix: str = "give a save_to_disk folder or a "
                          "Hub dataset id") -> Any:
    """The `datasets.Dataset` at a `save_to_disk` folder or a Hub dataset id (see `locate_source`), split chosen;
    a file, a missing path, an unreachable Hub or a missing split is a `MixDataError` (`file_fix` says what to do
    with a file).

    Example:
        >>> load_dataset_location("mixes/paper")  # doctest: +SKIP
    """
    import datasets

    kind, where = locate_source(location)
    if kind == "file":
        raise MixDataError(location, None, None, "is a file, not a save_to_disk folder or a Hub dataset id", file_fix)
    ds = _load_from_disk(where) if kind == "dir" else _load_from_hub(location, split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise MixDataError(location, None, None, f"has no split {split!r} (it has {list(ds)})",
                               "choose one of the splits")
        ds = ds[split]
    return ds


_HUB_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")  # namespace/name
_HUB_PROBE_SECONDS = 1.5


def locate_source(location: str) -> tuple[str, str]:
    """Say what `location` names: ("file", path), ("dir", path) or ("hub", dataset id).

    An existing file or folder is local (`~` is expanded). Otherwise `org/name` (one `/`; letters, digits, `_.-`) is
    a Hub dataset id unless it looks local: it ends in .json/.jsonl or its first component (`org`) exists here.
    Anything else (`./x`, `/abs/x`, `~/x`, `x.json`, `a/b/c`, a name without `/`) is a missing local path, refused
    as "not found" (with close names from its folder), never sent to the Hub.

    Example:
        >>> locate_source("HuggingFaceH4/llava-instruct-mix-vsft")
        ('hub', 'HuggingFaceH4/llava-instruct-mix-vsft')
    """
    path = os.path.expanduser(location)
    if os.path.isfile(path):
        return "file", path
    if os.path.isdir(path):
        return "dir", path
    if os.path.exists(path):
        raise MixDataError(location, None, None, "is neither a regular file nor a folder",
                           "give a .json/.jsonl file, a save_to_disk folder, or a Hub dataset id 'org/name'")
    first = location.split("/", 1)[0]
    if (_HUB_ID.fullmatch(location) and not location.lower().endswith((".json", ".jsonl"))
            and not os.path.lexists(first)):
        return "hub", location
    folder, base = os.path.split(os.path.normpath(path))
    folder = folder or "."
    try:
        close = difflib.get_close_matches(base, os.listdir(folder), n=3)
    except OSError:  # the folder is missing or unreadable too
        close = []
    hint = f" (did you mean {' or '.join(repr(os.path.join(folder, c)) for c in close)}?)" if close else ""
    if _HUB_ID.fullmatch(location) and os.path.lexists(first):
        hint += f"; it is read as a local path, not a Hub id, because {first!r} exists here"
    raise MixDataError(location, None, None, f"not found: no such file or folder{hint}",
                       "check the path (a .json/.jsonl file or a save_to_disk folder), or give a Hub dataset id "
                       "'org/name'")


def _load_from_disk(path: str) -> Any:
    """`datasets.load_from_disk`, with a folder that is not a saved dataset refused in one line."""
    import datasets

    try:
        return datasets.load_from_disk(path)
    except (OSError, ValueError, KeyError) as e:
        raise MixDataError(path, None, None, f"is a folder but not a readable save_to_disk dataset "
                           f"({_first_line(e)})", "give a .json/.jsonl file, or a folder written by "
                           "`Dataset.save_to_disk` or `trl-rejection mix`") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _hub_reachable() -> bool:
    """Whether the Hub endpoint answers within `_HUB_PROBE_SECONDS` (any HTTP status counts; proxies are used)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                                   timeout=_HUB_PROBE_SECONDS)
            answered.set()
        except urllib.error.HTTPError:
            answered.set()
        except urllib.error.URLError as e:  # a TLS error (custom CA bundle, mirror) still means the host answered
            if isinstance(e.reason, ssl.SSLError):
                answered.set()
        except ssl.SSLError:
            answered.set()
        except (OSError, ValueError):
            pass

    threading.Thread(target=probe, daemon=True).start()  # a name lookup can hang past any socket timeout
    return answered.wait(_HUB_PROBE_SECONDS)


def _load_from_hub(repo_id: str, split: str) -> Any:
    """`datasets.load_dataset(repo_id)`; offline (HF_HUB_OFFLINE=1, or the Hub does not answer) only the local cache
    is tried, so a missing dataset fails in about a second with one line instead of retrying for minutes."""
    import datasets
    from huggingface_hub import constants

    offline = datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else ""
    if not offline and not _hub_reachable():
        why = f"the Hub ({constants.ENDPOINT}) cannot be reached"
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if why:  # cached datasets still load
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(repo_id, split=split)
    except (OSError, ValueError) as e:
        if why:
            raise MixDataError(repo_id, None, None, f"not found: there is no such local file or folder, and as a Hub "
                               f"dataset id it is not in the local datasets cache ({why})", "check the path (a "
                               "local one may start with './'), or connect to the network for a Hub dataset") from None
        raise MixDataError(repo_id, None, None, f"could not be loaded from the Hub ({_first_line(e)})",
                           "check the dataset id 'org/name' and the split; log in (`hf auth login`) for gated or "
                           "private datasets") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
