"""The file-safety rules every writer of this project follows, in one place.

- `check_work_dir` / `check_output_dir`: where a tool may write, and what `--overwrite` may replace (only a folder
  the tool wrote before; never the current folder, a parent of it, the home folder, `/`, a symlink, or a folder
  holding the inputs).
- `staging_dir` + `replace_dir`: build beside the target in a hidden temporary folder that is provably ours, then
  swap it in so that at every instant `output_dir` holds either the complete old result or the complete new one.
  Temporary folders left by a killed run are removed on the next run for the same `output_dir`.
- `atomic_write_text`: a file is written whole or not at all.
- `safe_name` / `inside`: file names derived from data cannot leave their folder; paths are compared after
  resolving symlinks.
- `check_image`: an image decodes, or the error names the record.
- `terminate_as_interrupt`: SIGTERM unwinds like Ctrl-C, so `finally` blocks clean up.

Example:
    >>> safe_name("../../etc/passwd")[:14]
    '.._.._etc_pass'
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

_TAG = "trl-rejection"
_OWNER_FILE = ".trl_rejection_tmp.json"  # inside each of our temporary folders: what it is for, and who made it


class UnsafePathError(UserError):
    """A path the tool refuses to write to, replace, or read through."""


def real(path: str | os.PathLike) -> Path:
    """`path` made absolute with every symlink resolved (the file need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when `path`, symlinks resolved, is `folder` or lies under it (symlinks of `folder` resolved too)."""
    p, f = real(path), real(folder)
    return p == f or f in p.parents


def check_work_dir(folder: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                   what: str = "output") -> Path:
    """Refuse a folder no tool should write into or replace: `/`, the home folder, the current folder or a parent
    of it, a symlink, or a folder holding one of `inputs`. Return its resolved path (it may exist: runs resume)."""
    out, shown = real(folder), os.fspath(folder)
    example = f"outputs/{what.replace(' ', '_')}"
    forbidden = {Path("/"): "the root folder", real(Path.home()): "your home folder"}
    if out in forbidden:
        raise UnsafePathError(f"{shown} is {forbidden[out]}. Fix: choose a new folder for the {what}, e.g. {example}")
    if inside(Path.cwd(), out):
        raise UnsafePathError(f"{shown} is the current folder or a parent of it. Fix: choose a new sub-folder for "
                              f"the {what}, e.g. {example}")
    if Path(os.path.abspath(os.path.expanduser(shown))).is_symlink():
        raise UnsafePathError(f"{shown} is a symlink (to {out}); the {what} is not written through links. Fix: "
                              "give the real folder, or choose a new one")
    for item in inputs:
        if item and os.path.exists(item) and inside(item, out):
            raise UnsafePathError(f"{shown} holds the input {os.fspath(item)!r}, which writing there could "
                                  f"replace. Fix: choose a folder for the {what} outside the inputs' folders")
    return out


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool, marker: str,
                     inputs: Iterable[str | os.PathLike | None] = (), what: str = "output") -> Path:
    """Check that the tool may write (or, with `overwrite`, replace) `output_dir`; return its resolved path.

    On top of `check_work_dir`: if it exists, `overwrite` must be set and it must be a folder this tool wrote
    before (it holds `marker`). Otherwise `UnsafePathError` / `FileExistsError`, with nothing touched.
    """
    out, shown = check_work_dir(output_dir, inputs=inputs, what=what), os.fspath(output_dir)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{shown} exists. Fix: choose another output_dir or pass overwrite=True "
                                  "(--overwrite) to replace an earlier result there")
        if not out.is_dir() or not (out / marker).is_file():
            raise UnsafePathError(f"{shown} exists and is not a {what} this tool wrote (it has no {marker}), so "
                                  "--overwrite will not replace it. Fix: choose another output_dir, or move that "
                                  "folder away yourself")
    return out


def pid_alive(pid: int) -> bool:
    """True when a process `pid` runs on this host (signal 0 probe)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(folder: Path, target: Path) -> dict | None:
    """The owner record of one of our temporary folders for `target`, or None when `folder` is not provably ours."""
    try:
        owner = json.loads((folder / _OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and owner.get("tool") == _TAG and owner.get("target") == str(target) \
        else None


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _staging_prefix(target: Path, pid: int | None = None) -> str:
    """Name prefix of a staging folder for `target`: it carries the creating process and host, so a folder whose
    owner file a kill prevented (or cut short) is still known as that process's."""
    return f".{target.name}.{_TAG}-{os.getpid() if pid is None else pid}-{_host_tag()}-"


def _unmarked_and_dead(folder: Path, target: Path) -> bool:
    """A staging folder of a process of this host that no longer runs, killed before its owner file was complete:
    named by `_staging_prefix`, holding nothing but (at most) that partial file."""
    match = re.fullmatch(re.escape(f".{target.name}.{_TAG}-") + r"(\d+)-([0-9a-f]{8})-[^/]+", folder.name)
    if match is None or match.group(2) != _host_tag() or pid_alive(int(match.group(1))):
        return False  # not ours by name, made on another host, or its process still runs
    return {p.name for p in folder.iterdir()} <= {_OWNER_FILE}


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove temporary folders that earlier, killed runs left beside `target`; return what was removed.

    Only hidden folders named for `target` whose owner file says they are ours, for this `target`, made by a
    process (on this host) that no longer runs, are removed, and staging folders of such a process killed before
    its owner file was written (nothing else inside). A folder set aside during an interrupted swap is moved back to
    `target` when `target` is missing.
    """
    target = real(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for folder in sorted(target.parent.glob(f".{target.name}.{_TAG}-*")):
        owner = _ours(folder, target)
        if owner is None and _unmarked_and_dead(folder, target):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            continue
        if owner is None or (owner.get("host") == socket.gethostname() and pid_alive(int(owner.get("pid", 0)))):
            continue
        if owner.get("role") == "previous" and not target.exists():
            (folder / _OWNER_FILE).unlink()
            os.replace(folder, target)  # the swap was cut between its two renames: the old result comes back
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _mark(folder: Path, target: Path, role: str) -> None:
    owner = {"tool": _TAG, "target": str(target), "role": role, "pid": os.getpid(), "host": socket.gethostname()}
    (folder / _OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")


@contextmanager
def staging_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden folder beside `target`, marked as ours, removed on exit (stale ones of earlier runs first)."""
    target = real(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    work = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
    try:
        _mark(work, target, "staging")
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux `renameat2(RENAME_EXCHANGE)`); False where the system can't."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete folder `new` to `target`, replacing a previous result there without a moment in which
    `target` is half-written: an atomic exchange where the system has one, else rename the old one aside, move the
    new one in, delete the old one (`clean_stale` restores the old one if a kill cut that short)."""
    new, target = Path(new), real(target)
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)
        return
    aside = target.parent / f".{target.name}.{_TAG}-previous-{os.getpid()}"
    _mark(target, target, "previous")  # travels with the old folder, so a cut swap can be undone
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole, or not at all (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename: whole, or not at all."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, max_chars: int = 64) -> str:
    """A file name made from `text` (e.g. a record id) that cannot name another folder: unsafe characters become
    `_`, it never starts with a dot, and a hash of `text` keeps distinct ids distinct."""
    stem = _UNSAFE.sub("_", text)[:max_chars].lstrip(".") or "_"
    return f"{stem}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def safe_suffix(path: str | None, default: str = ".png") -> str:
    """The file extension of `path` when it is a plain one (`.jpg`, `.png`, ...), else `default`."""
    suffix = Path(path or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else default


def write_inside(folder: str | os.PathLike, name: str, data: bytes) -> Path:
    """Write `data` to `folder/name`, refusing any `name` that would land outside `folder`."""
    dest = Path(folder) / name
    if not inside(dest, folder) or real(dest) == real(folder):
        raise UnsafePathError(f"the file name {name!r} would be written outside {folder}. Fix: report this as a bug")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def check_image(path: str | None = None, data: bytes | None = None, level: str = "decode") -> str | None:
    """Decode the image at `path` (or in `data`); return None if it decodes, else what is wrong with it.

    JPEGs are decoded at reduced scale (`draft`), which still reads every byte of the compressed stream, so a
    truncated or corrupt file is found at a fraction of the cost of a full decode. `level="open"` only
    reads the header (finds empty, missing and non-image files, not truncated ones).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if path is not None and os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            if level == "open":
                return None
            if im.format == "JPEG":
                im.draft("RGB", (64, 64))
            im.load()
    except UnidentifiedImageError:
        return "the file is not an image PIL can read"
    except (OSError, SyntaxError, ValueError) as e:
        return f"the image does not decode ({e})"
    return None


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `KeyboardInterrupt` (as Ctrl-C does), so cleanup in `finally` blocks runs.

    Only the main thread can install signal handlers; elsewhere this does nothing.
    """
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
