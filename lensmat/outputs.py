"""Output folders lensmat owns: checked before any work, locked against a second run, built in a
temporary sibling and renamed into place, and replaced only when lensmat wrote all of them.

Every command and every saved artifact writes its folder through :func:`publish`:

- :func:`claim` (before any work) refuses an ``out`` that is a file, lies inside a file, is the
  current directory, contains one of the run's inputs, sits on a read-only parent, or exists
  holding files lensmat did not write (with or without ``force``); an existing lensmat folder is
  replaced only with ``force``. It takes the lock ``<parent>/.<name>.lensmat-lock`` (the process
  id inside), so a second run on the same ``out`` stops at once; a lock whose process is gone is
  taken over.
- :func:`publish` builds the folder in ``<parent>/.<name>.partial``, writes the manifest
  ``.lensmat-output.json`` (every file it holds), then renames it into place. A killed, failed or
  disk-full run leaves no half-written folder, and its ``.partial`` is removed by the next run.

Depends on the standard library only.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

MANIFEST = ".lensmat-output.json"
_MANIFEST_TMP = f".{MANIFEST}.tmp"  # a manifest being rewritten (:func:`_manifest`)
# what lensmat wrote before the manifest existed (0.1.0): recognised as its own by these names alone
_LEGACY_NAMES = {"report.json", "meta.json", "maps.safetensors", "lens.safetensors", "stats.safetensors",
                 "trajectory.csv"}
COMMAND_LINE: list[str] = []  # ["lensmat", *argv] when the CLI runs (lensmat.cli.app.main): a report's provenance
_held: dict[Path, int] = {}  # lock file -> claims held by this process (claims nest)


_interrupted = False  # a Ctrl-C arrived (catch_interrupts): raised again at every check_interrupted()


def catch_interrupts() -> None:
    """Make Ctrl-C sticky in this process (the command line calls it): SIGINT raises
    ``KeyboardInterrupt`` as usual and is also remembered, so an interrupt that lands where Python
    ignores exceptions (inside a ``__del__`` or a weakref callback, which print "Exception ignored"
    and go on) is raised again at the next :func:`check_interrupted`. Main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # SIGINT ignored (a shell's background job) or handled by the caller: theirs to decide

    def interrupted(signum, frame):
        global _interrupted
        _interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)


def check_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C arrived since :func:`catch_interrupts` (a long loop's safe point)."""
    if _interrupted:
        raise KeyboardInterrupt


class OutputError(ValueError):
    """An output folder that lensmat must not write or replace."""


def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lensmat-lock"


def _partial(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


def _entries(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """Entries of the folder ``path`` that lensmat did not write (relative paths, sorted).

    lensmat's own are those its manifest lists; a folder without a manifest (written by lensmat
    0.1.0) counts as lensmat's when it holds only report, artifact, CSV and PNG files."""
    path = Path(path)
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            owned = set(json.loads(manifest.read_text(encoding="utf-8"))["files"]) | {MANIFEST, _MANIFEST_TMP}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            owned = set()
        return [e for e in _entries(path) if e not in owned]
    return [e for e in _entries(path)
            if not ((path / e).is_dir() or Path(e).name in _LEGACY_NAMES or e.endswith(".png"))]


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out(out: str | os.PathLike, force: bool = False, inputs: Iterable = ()) -> Path:
    """Refuse ``out`` before any work when it cannot or must not be written (see module docstring);
    ``inputs``: paths the run reads (corpus, model folder, maps), which ``out`` must not contain."""
    text = str(out)
    if not text.strip():
        raise OutputError("--out is empty; name the folder to write, e.g. --out runs/mine.")
    path = Path(text).expanduser()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop: RuntimeError before Python 3.13
        raise OutputError(f"--out {text} cannot be resolved ({err}); check the symlinks on that path.") from None
    if resolved == Path.cwd().resolve():
        raise OutputError(f"--out {text} is the current directory; lensmat writes a folder of its own, "
                          "e.g. --out runs/compare.")
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"--out {text} lies inside {parent}, which is a file, not a folder; choose another --out.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"--out {text}: the folder {parent} is not writable (read-only or no permission); "
                                  "choose another --out.")
            break
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {text} is a file, not a folder; choose another --out (lensmat writes a folder).")
    for given in inputs:
        if given is None or not isinstance(given, (str, os.PathLike)) or not Path(given).exists():
            continue
        if _inside(Path(given).resolve(), resolved):
            raise OutputError(f"--out {text} contains the input {given}; replacing it would delete what the run reads. "
                              "Choose another --out.")
    if path.is_dir() and any(path.iterdir()):
        foreign = foreign_entries(path)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputError(f"--out {text} holds files lensmat did not write ({shown}); lensmat replaces only its own "
                              "folders, with or without --force. Choose another --out, or move those files away.")
        if not force:
            raise FileExistsError(f"{text} already exists; choose another --out or pass --force to replace it "
                                  "(it holds lensmat output only).")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _take_lock(lock: Path, out: str) -> None:
    mine = str(os.getpid())
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                raise OutputError(f"Another lensmat run (process {holder}) is writing {out}; wait for it to finish or "
                                  f"choose another --out (if no run is active, delete {lock}).") from None
            lock.unlink(missing_ok=True)  # our own or a dead process's lock: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return


def _release_all() -> None:
    for lock in list(_held):
        _release(lock, all_claims=True)


def _release(lock: Path, all_claims: bool = False) -> None:
    _held[lock] = 0 if all_claims else _held[lock] - 1
    if _held[lock] <= 0:
        del _held[lock]
        try:
            if lock.read_text().strip() == str(os.getpid()):
                lock.unlink()
        except OSError:
            pass


atexit.register(_release_all)


@contextmanager
def claim(out: str | os.PathLike | None, force: bool = False, inputs: Iterable = ()) -> Iterator[Path | None]:
    """Check ``out`` (:func:`check_out`) and hold its lock for the block; claims by one process nest.
    ``out=None`` (nothing written) claims nothing."""
    if out is None:
        yield None
        return
    path = check_out(out, force, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_file(path)
    if lock not in _held:
        _take_lock(lock, str(out))
    _held[lock] = _held.get(lock, 0) + 1
    try:
        yield path
    finally:
        _release(lock)


def writes_output(fn):
    """Decorate a function with ``out`` and ``force`` keywords: claim ``out`` before it runs (the
    inputs it names, ``dataset``, ``maps``, ``tuned``, ``jlens`` and a model path, are kept out of it)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        inputs = [kwargs.get(k) for k in ("dataset", "maps", "tuned", "jlens", "model")] + list(args[:2])
        with claim(kwargs.get("out"), kwargs.get("force", False), inputs):
            return fn(*args, **kwargs)

    return run


def refresh_manifest(folder: str | os.PathLike) -> None:
    """List every file of the lensmat folder ``folder`` (claimed by the caller, holding nothing
    foreign: :func:`check_out`) in its manifest again, after lensmat wrote more into it, so that the
    folder stays lensmat's; a folder without one (lensmat 0.1.0) gets one."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        meta = {}
    _manifest(folder, {k: v for k, v in meta.items() if k not in ("written_by", "files")})


def _manifest(folder: Path, meta: dict) -> None:
    """Write ``folder``'s manifest (atomically: a temporary file, then rename) listing its files."""
    files = [e for e in _entries(folder) if e not in (MANIFEST, _MANIFEST_TMP)]
    tmp = folder / _MANIFEST_TMP
    tmp.write_text(json.dumps({"written_by": "lensmat", **meta, "files": files}, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


@contextmanager
def publish(out: str | os.PathLike, force: bool = False, **meta) -> Iterator[Path]:
    """Yield an empty temporary folder to write ``out``'s files into; on success write the manifest
    (with ``meta``) and rename it to ``out`` (replacing lensmat's earlier folder when ``force``), on
    failure remove it. Nothing at ``out`` changes until the rename."""
    with claim(out, force) as path:
        tmp = _partial(path)
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted run's leftover: ours by its exact name
        tmp.mkdir()
        try:
            yield tmp
            _manifest(tmp, meta)
            if path.exists():
                check_out(path, force)
                old = path.parent / f".{path.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def remove_owned(path: str | os.PathLike) -> bool:
    """Remove the folder ``path`` if lensmat wrote all of it (e.g. a finished fit's checkpoint);
    returns whether it did. A folder holding anything else is left as it is."""
    path = Path(path)
    if not path.is_dir() or foreign_entries(path):
        return False
    with claim(path, force=True):
        shutil.rmtree(path)
    return True
