"""Files written atomically (a crash mid-write leaves the previous file intact), content hashes, the git commit."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

REPO_DIR = Path(__file__).resolve().parents[1]
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then put back
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file: mkstemp's temp files are 0600


def atomic_write(path, write, suffix=""):
    """Write through ``write(tmp_path)`` to a temp file in the same folder, then rename over ``path``:
    a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path):
    """Write a whole folder (a save_pretrained model): the caller writes into the temp folder this yields, beside
    ``path``; then its files are synced and it is renamed to ``path``. Readers see the previous folder or the new one,
    never a half-written one; a folder already at ``path`` is renamed aside first and removed after (a crash between
    the two renames leaves it whole under ``.NAME.old-*``)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # as a folder made with mkdir (mkdtemp's is the owner's alone)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path, text: str):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path, obj):
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_npy(path, array):
    atomic_write(path, lambda tmp: np.save(tmp, array), suffix=".npy")


def atomic_write_parquet(path, frame):
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def file_sha256(path, chunk=1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remembered_sha256(path, ledger) -> str:
    """file_sha256 of ``path``, remembered in the JSON file ``ledger`` against the file's size and modification time
    in ns (what make and git trust): a second start need not read a model of hundreds of MB again to fingerprint its
    index. A ledger that cannot be read is started anew; one that cannot be written is only not updated."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    try:
        known = json.loads(Path(ledger).read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path)) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = file_sha256(path)
    known = {**(known if isinstance(known, dict) else {}), str(path): {"stamp": stamp, "sha256": digest}}
    with contextlib.suppress(OSError):
        atomic_write_json(ledger, known)
    return digest


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def read_json(path) -> dict:
    """The file's JSON object, or {} when it is missing or damaged (whatever it described is then rebuilt)."""
    try:
        value = json.loads(Path(path).read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def fingerprint(parts: dict) -> str:
    """A content hash of what something was built from (JSON-able parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
