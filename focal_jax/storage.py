"""The one path layer: every file of a workdir, an export or a conversion goes through here,
so a `gs://` path (any scheme `etils.epath` knows) works wherever a local path does.

Local paths use the OS directly (atomic renames, fsync, free space); others go through
`etils.epath`, the layer orbax uses too. On a bucket there is no free space to check (its
capacity is not fixed), appending rewrites the object (objects are immutable), a "move"
is a copy and a delete per object, and a write is visible whole or not at all.
Orbax's arrays go through tensorstore, which reads the same URLs natively.
"""

from __future__ import annotations

import os
import shutil
from etils import epath


def is_remote(path: str) -> bool:
  """True for a URL such as gs://bucket/dir (anything with a scheme)."""
  return "://" in os.fspath(path)


def absolute(path: str) -> str:
  """An absolute local path, or the URL unchanged (os.path.abspath would mangle it)."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return os.path.join(os.fspath(path), *parts)


def exists(path: str) -> bool:
  return os.path.exists(path) if not is_remote(path) else epath.Path(path).exists()


def isdir(path: str) -> bool:
  return os.path.isdir(path) if not is_remote(path) else epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  p = epath.Path(path)
  return p.exists() and not p.is_dir()


def makedirs(path: str) -> None:
  """Creates the directory and its parents (on a bucket: nothing to create but the name)."""
  if is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  if not is_remote(path):
    return os.listdir(path)
  return sorted(p.name for p in epath.Path(path).iterdir())


def read_bytes(path: str) -> bytes:
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes, sync: bool = False) -> None:
  """Writes the whole file (replacing it). Locally through a temporary file and a rename,
  so a reader never sees half of it; `sync` also fsyncs it first."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)  # an object appears whole when its upload completes
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      if sync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def append_text(path: str, text: str) -> None:
  """Appends to a file (on a bucket: rewrites the object with `text` added)."""
  if not is_remote(path):
    with open(path, "a") as f:
      f.write(text)
    return
  old = read_bytes(path) if exists(path) else b""
  write_bytes(path, old + text.encode("utf-8"))


def remove(path: str) -> None:
  if is_remote(path):
    epath.Path(path).unlink(missing_ok=True)
  elif os.path.exists(path):
    os.remove(path)


def move(source: str, target: str) -> None:
  """Moves a file or a directory tree (on a bucket: each object copied, then deleted)."""
  if not (is_remote(source) or is_remote(target)):
    shutil.move(source, target)
    return
  src, dst = epath.Path(source), epath.Path(target)
  if not src.is_dir():
    src.copy(dst, overwrite=True)
    src.unlink()
    return
  for relative in _relative_files(src):  # objects only: a bucket's "directories" are prefixes
    (src / relative).copy(dst / relative, overwrite=True)
  src.rmtree()


def _relative_files(root: epath.Path, prefix: str = "") -> list[str]:
  files = []
  for path in root.iterdir():
    if path.is_dir():
      files += _relative_files(path, f"{prefix}{path.name}/")
    else:
      files.append(prefix + path.name)
  return files


def free_bytes(path: str) -> int | None:
  """Free space of the filesystem holding `path`; None on a bucket (no fixed capacity)."""
  return None if is_remote(path) else shutil.disk_usage(path).free


def download(path: str, local_dir: str) -> str:
  """A local copy of the file `path` in `local_dir` (the path itself when local)."""
  if not is_remote(path):
    return path
  local = os.path.join(local_dir, os.path.basename(path))
  with open(local, "wb") as f:
    f.write(read_bytes(path))
  return local


def upload(local: str, path: str) -> None:
  """Copies the local file `local` to `path` (nothing when they are the same)."""
  if os.path.abspath(local) == absolute(path):
    return
  with open(local, "rb") as f:
    write_bytes(path, f.read())
