"""Activation stores on disk: safetensors shards plus a JSON manifest, written crash-safe, read
memory-mapped.

An output directory::

    manifest.json               settings, versions, environment (device type, backend), and one
                                record per complete shard (file, bytes, sha256, sequences, rows,
                                source offsets); "complete": true at the end
    shard-000000.safetensors    "<output>.<layer_id>" per captured output and residual index:
                                  resid/delta/normed [rows, d_model], mean/rstd/l2/maxabs [rows] float32
                                "input_ids" [seqs, seq_len] int32, "source" [seqs, 2] int64
                                  (document, token offset of each sequence's first token)
                                "attention_mask" [seqs, seq_len] uint8 (padded inputs only)
                                "seq_index" [rows] int64, "position" [rows] int32 (where each row is from)
    manifest.rank<r>.json       during a multi-process run: rank r's complete shards (merged at the end)

A row is one captured token: the selected positions of each sequence, padding left out.

Crash safety: a shard is written under a temporary name, fsynced, hashed, renamed, and only then
recorded in the manifest, which is itself replaced atomically (temporary file, fsync, rename). A file
the manifest does not list is never taken as complete.
"""

from __future__ import annotations

import builtins
import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import stat
import struct
import time
from typing import Iterator, NamedTuple, Sequence

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None

import numpy as np
import torch

from .selection import is_int, parse_size, positive_int

FORMAT = "residtap.activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROW_TENSORS = ("seq_index", "position")
SEQ_TENSORS = ("input_ids", "attention_mask", "source")

# safetensors dtype codes → torch dtypes (the ones we write, and a few more to read others' files)
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


class StoreError(RuntimeError):
    """Reading or writing an activation store failed; the message says what, where and what to do."""


class ManifestMismatchError(StoreError):
    """The output directory holds an extraction made with different settings."""


class ShardCorruptError(StoreError):
    """A shard's bytes do not match the manifest (size or sha256)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


SHARD_FILE = re.compile(r"shard-\d{6,}\.safetensors")  # shard_name's names


# In an extraction directory: the file a run holds an exclusive flock on while it writes there (rank 0
# of a multi-process run), so that a second run into the same directory is refused, not interleaved.
LOCK = ".residtap.lock"


def lock_directory(directory: str) -> int | None:
    """Take ``directory``'s run lock; returns the descriptor to keep open (closing it releases the lock),
    or None where the file system cannot lock (or is read-only, so no run can write there either). A
    StoreError where another process holds it.

    The holder may remove the file before letting go (a run that leaves nothing there): a run that
    opened the file before the removal then holds a lock on a file no longer in the directory, so a
    lock counts only while the file at the path is the one locked; otherwise it is taken again."""
    if fcntl is None:
        return None
    path = os.path.join(directory, LOCK)
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"out: another extraction is writing to {directory!r} now (it holds the lock "
                             f"on {path!r}); wait for it to finish, or choose another directory") from None
        except OSError:  # no flock here (some network file systems): no lock file left behind either
            os.close(fd)
            _remove_quietly(path)
            return None
        try:
            now, held = os.stat(path), os.fstat(fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except OSError:
            pass
        os.close(fd)  # the file was removed (or replaced) while we waited: take the one there now
    raise StoreError(f"out: could not take the lock on {path!r}: it keeps being replaced")


def lock_records(directory: str, timeout: float | None = None) -> int | None:
    """Take the lock the processes of one multi-process run share while they decide whether a shard
    may still be recorded (extract: a rank's first record, and rank 0 taking back a run that failed
    before any): an flock on ``directory`` itself, so that no file of its own is left behind (the run
    lock above is another file's, held by rank 0 all along). Returns the descriptor to close, or None
    where the directory is gone, the file system cannot lock, or ``timeout`` seconds passed first
    (None: wait for it)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        except OSError:  # no flock here (some network file systems, or on a directory)
            break
    os.close(fd)
    return None


PART_PREFIX = "manifest.rank"  # part_name's names (and their temporaries, + ".tmp") start so


def part_name(rank: int) -> str:
    return f"{PART_PREFIX}{rank}.json"


def tensor_name(output: str, layer_id: int) -> str:
    return f"{output}.{layer_id}"


# ---------------------------------------------------------------------------------------- writing
def os_error(e: OSError, doing: str, path: str) -> StoreError:
    """An OSError as one clear sentence: what we were doing, where, why, and what to do."""
    why = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system", errno.ENOTDIR: "a component of the path is not a "
           "directory"}.get(e.errno, e.strerror or str(e))
    hint = (" Free some space (or choose another --out) and run the same command again: it resumes "
            "after the last complete shard." if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    return StoreError(f"{doing} {path!r} failed: {why} ({type(e).__name__} errno {e.errno}).{hint}")


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (POSIX: the directory entry needs its own fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_ENCODER = json.JSONEncoder(sort_keys=True)  # json's C encoder (none is used where an indent is asked for)


def json_line(value) -> str:
    """``value`` as one line of JSON, keys sorted, by json's C encoder: three times faster than
    ``json.dumps(indent=1)``, whose pure-Python encoder holds the GIL (which the forwards of an
    extraction need) all the while."""
    return _ENCODER.encode(value)


def manifest_text(fields: dict, shard_lines: Sequence[str] | None = None) -> str:
    """``fields`` as the manifests are written: a JSON object with one top-level key per line, sorted,
    and the items of a top-level list of objects one per line, so that a manifest reads (and greps) as
    one shard record per line. ``shard_lines``: the items of "shards" already encoded (json_line), which
    extraction keeps so that rewriting the manifest after each shard does not encode every record
    again: a rewrite is then a join (0.3 ms at 1,000 records here), not an encoding of them all (11-22
    ms with the indent, 3.4 without: it grew with every shard, and held the GIL)."""
    items = dict(fields)
    if shard_lines is not None:
        items["shards"] = shard_lines
    lines = []
    for key in sorted(items):
        value = items[key]
        inner = None  # the items of a list written one per line, encoded
        if value is shard_lines:
            inner = value
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            inner = list(map(json_line, value))
        text = "[\n  " + ",\n  ".join(inner) + "\n ]" if inner else json_line(value)
        lines.append(f" {json_line(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_json_atomic(path: str, obj: dict, shard_lines: Sequence[str] | None = None) -> None:
    """Replace ``path`` with ``obj`` (and ``shard_lines``, see manifest_text) as JSON, never leaving a
    half-written file under that name."""
    tmp = f"{path}.tmp"
    data = manifest_text(obj, shard_lines).encode()
    try:
        with builtins.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:  # a KeyboardInterrupt too (Ctrl-C outside extract's window: the final manifest)
        _remove_quietly(tmp)
        if isinstance(e, OSError):
            raise os_error(e, "writing the manifest", path) from e
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    """The file's sha256, hashed from a read-only memory map: the page cache's pages themselves, not
    a copy of them (a quarter to a third less time than read() into a buffer, measured on 128 MiB),
    in one update, during which hashlib releases the GIL. Not in chunks: a thread taking the GIL back
    after each one waits up to the interpreter's switch interval (5 ms) while the forwards' thread runs
    Python, which made hashing 8 MiB chunks 1.5x slower then (548 against 364 ms for 256 MiB on this
    project's CPU machine). Where the file cannot be mapped (empty, or a file system without mmap) it
    is read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with builtins.open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except (OSError, ValueError):
            m = None
        if m is None:
            buf = bytearray(chunk)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
        else:
            with m, memoryview(m) as view:  # the view is released before the map is closed
                h.update(view)
    return h.hexdigest()


def _save_file(tensors: dict, path: str, metadata: dict) -> None:
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except OSError:
        raise
    except Exception as e:
        # safetensors reports a failed write (a full disk) as SafetensorError("... (os error 28)"):
        # an OSError with that errno, so it gets the same clear message as any other I/O error.
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from e


class PendingShard(NamedTuple):
    """A shard written and fsynced under its temporary name, not yet hashed or renamed."""

    index: int
    work: str  # the shard's own temporary directory
    tmp: str  # the file in it
    final: str  # where it goes once hashed


def write_shard_file(directory: str, index: int, tensors: dict[str, torch.Tensor],
                     metadata: dict) -> PendingShard:
    """The first half of :func:`write_shard`: the shard's bytes written and fsynced under a temporary
    name, so that the tensors' memory can be reused at once; :func:`publish_shard` then hashes and
    renames it. On any error the temporary files are removed and a StoreError says why. It is
    :func:`save_shard_file` then :func:`sync_shard_file`, which a caller may run apart (extract does:
    it hashes the written file while the fsync runs)."""
    pending = save_shard_file(directory, index, tensors, metadata)
    sync_shard_file(pending)
    return pending


def save_shard_file(directory: str, index: int, tensors: dict[str, torch.Tensor],
                    metadata: dict) -> PendingShard:
    """The shard's bytes written under a temporary name, not yet fsynced (:func:`sync_shard_file`):
    the tensors' memory may be reused once it returns. On any error the temporary files are removed
    and a StoreError says why.

    Everything temporary lives in a directory of this shard's own (``.shard-N.tmp/``): safetensors
    writes through a temporary file of its own naming beside its target, which a SIGKILL leaves
    behind, and only the rank that owns shard N may remove it on resume (see
    remove_stale_temporaries).
    """
    name = shard_name(index)
    work = _temp_dir(directory, index)
    tmp = os.path.join(work, name)
    with _removed_on_error(work, f"writing shard {index} to", tmp):
        _remove_tree_quietly(work)  # a killed attempt's leftovers
        os.mkdir(work)
        # One metadata key: safetensors keeps metadata in a hash map whose order varies between
        # processes, and the bytes of a shard must not.
        _save_file(tensors, tmp, {"residtap": json.dumps(metadata, sort_keys=True)})
        # safetensors writes through a temporary file of mode 0600 and renames it: give the shard
        # the mode any new file gets here (0666 less the umask, as os.mkdir gave ``work`` 0777 less
        # it), so that whoever may read the manifest may read the shards too.
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(work).st_mode) & 0o666)
        except OSError:  # a file system without modes (some network mounts): the shard stays as written
            pass
    return PendingShard(index, work, tmp, os.path.join(directory, name))


def sync_shard_file(pending: PendingShard) -> None:
    """fsync what :func:`save_shard_file` wrote (before :func:`publish_shard` renames it: a shard is
    durable under its final name or not there). On an error, what was written is removed and a
    StoreError says why."""
    with _removed_on_error(pending.work, f"writing shard {pending.index} to", pending.tmp):
        fd = os.open(pending.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _removed_on_error(work: str, doing: str, path: str):
    """On any error inside: a shard's temporary directory ``work`` removed, and an OSError raised as
    os_error(doing, path)."""
    try:
        yield
    except BaseException as e:
        _remove_tree_quietly(work)
        if isinstance(e, OSError):
            raise os_error(e, doing, path) from e
        raise


def hash_shard(pending: PendingShard) -> dict:
    """The written file's size and sha256 (read back from the page cache: the record vouches for the
    bytes in the file), for :func:`publish_shard`. On an error a StoreError says why and what was
    written is left for the caller to remove (:func:`discard_shard`; publish_shard does): it may be
    hashed while another thread still fsyncs it."""
    try:
        return {"bytes": os.path.getsize(pending.tmp), "sha256": sha256_file(pending.tmp)}
    except OSError as e:
        raise os_error(e, f"publishing shard {pending.index} as", pending.final) from e


def publish_shard(pending: PendingShard, hashed: dict | None = None) -> dict:
    """The second half of :func:`write_shard`: hash the written file (unless ``hashed``, what
    :func:`hash_shard` gave, says already), rename it to its final name and make the rename durable;
    returns the shard's manifest record fields (file, bytes, sha256)."""
    try:
        if hashed is None:
            hashed = hash_shard(pending)
        size, digest = hashed["bytes"], hashed["sha256"]
        os.replace(pending.tmp, pending.final)
        fsync_dir(os.path.dirname(pending.final))
    except OSError as e:
        raise os_error(e, f"publishing shard {pending.index} as", pending.final) from e
    finally:
        _remove_tree_quietly(pending.work)  # empty after the rename; on any error, what was written
    return {"file": os.path.basename(pending.final), "bytes": size, "sha256": digest}


def discard_shard(pending: PendingShard) -> None:
    """Remove what :func:`save_shard_file` wrote of a shard that is not to be published."""
    _remove_tree_quietly(pending.work)


def write_shard(directory: str, index: int, tensors: dict[str, torch.Tensor], metadata: dict) -> dict:
    """Write one shard crash-safe; return its manifest record fields (file, bytes, sha256).

    The file appears under its final name only once complete, fsynced and hashed; on any error the
    temporary files are removed and a StoreError says why. The two halves, for callers that overlap
    them: :func:`write_shard_file` and :func:`publish_shard`.
    """
    return publish_shard(write_shard_file(directory, index, tensors, metadata))


def _temp_dir(directory: str, index: int) -> str:
    return os.path.join(directory, f".{shard_name(index)}.tmp")


def _remove_tree_quietly(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(directory: str, owns) -> None:
    """What a killed run left of the shards ``owns(index)`` says are this rank's: their temporary
    directories (or bare temporary files, which earlier builds wrote)."""
    prefix, suffix = ".shard-", ".safetensors.tmp"
    for f in os.listdir(directory):
        if f.startswith(prefix) and f.endswith(suffix):
            try:
                index = int(f[len(prefix):-len(suffix)])
            except ValueError:
                continue
            if owns(index):
                path = os.path.join(directory, f)
                if os.path.isdir(path):
                    _remove_tree_quietly(path)
                else:
                    _remove_quietly(path)


# ---------------------------------------------------------------------------------------- manifests
def read_json(path: str) -> dict:
    try:
        with builtins.open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise StoreError(f"the manifest {path!r} is not valid JSON ({e}); it was not written by residtap "
                         "or was edited") from e
    except OSError as e:
        raise os_error(e, "reading the manifest", path) from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise StoreError(f"{path!r} is not a residtap activation manifest (format "
                         f"{obj.get('format') if isinstance(obj, dict) else None!r}, expected {FORMAT!r})")
    if obj.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path!r} has format_version {obj.get('format_version')!r}; this residtap reads "
                         f"and writes version {FORMAT_VERSION}")
    shards = obj.get("shards", [])
    if not isinstance(shards, list):
        raise StoreError(f"the manifest {path!r}: 'shards' is a {type(shards).__name__}, expected a list of "
                         "shard records; it was not written by residtap or was edited")
    for k, record in enumerate(shards):
        bad = [key for key, kind in _RECORD_FIELDS.items()
               if not isinstance(record, dict) or not isinstance(record.get(key), kind)
               or isinstance(record.get(key), bool)]
        if not bad and os.path.basename(record["file"]) != record["file"]:
            bad = ["file"]  # a name in the directory, not a path elsewhere
        if bad:
            raise StoreError(f"the manifest {path!r}: shard record {k} lacks or misstates {bad} (expected "
                             f"{ {key: kind.__name__ for key, kind in _RECORD_FIELDS.items()} }, a file name "
                             "in the directory); it was not written by residtap or was edited")
    return obj


# What every shard record holds, and of what type (read_json checks; the rest is read as written).
_RECORD_FIELDS = {"index": int, "file": str, "bytes": int, "sha256": str, "n_rows": int}


def manifest_paths(directory: str) -> list[str]:
    """manifest.json first (if present), then the rank parts of an unfinished multi-process run."""
    paths = [os.path.join(directory, MANIFEST)] if os.path.exists(os.path.join(directory, MANIFEST)) else []
    parts = sorted(f for f in os.listdir(directory) if f.startswith(PART_PREFIX) and f.endswith(".json"))
    return paths + [os.path.join(directory, f) for f in parts]


def settings_difference(have: dict, want: dict) -> list[str]:
    """Human-readable differences between two settings dicts (empty when equal)."""
    out = []
    for k in sorted(set(have) | set(want)):
        if have.get(k) != want.get(k):
            out.append(f"{k}: directory has {json.dumps(have.get(k))}, "
                       f"this run has {json.dumps(want.get(k))}")
    return out


def merged_records(manifests: Sequence[dict], directory: str | None = None) -> dict[int, dict]:
    """Every shard record of ``manifests``, one per shard index.

    Two manifests can disagree about a shard: one written before the shard was deleted and
    recomputed (by a run with a different process count, or after a version change) still holds
    the old record. Where they disagree and ``directory`` is given, the record that describes the
    file there wins (size, then sha256, computed only for such shards); otherwise the first.
    """
    found: dict[int, list[dict]] = {}
    for m in manifests:
        for r in m.get("shards", []):
            same = found.setdefault(int(r["index"]), [])
            if r not in same:
                same.append(r)
    records = {}
    for i, rs in found.items():
        records[i] = rs[0]
        if len(rs) > 1 and directory is not None:
            records[i] = next((r for r in rs if _describes(directory, r)), rs[0])
    return records


def record_mismatch(directory: str, record: dict, check_sha256: bool = True) -> str | None:
    """How the file of a shard ``record`` differs from it: None where it matches, "missing", or
    what differs (its size, else, with ``check_sha256``, its sha256)."""
    return next(record_mismatches(directory, [record], check_sha256, threads=1))


def record_mismatches(directory: str, records: Sequence[dict], check_sha256: bool = True,
                      threads: int | None = None) -> Iterator[str | None]:
    """record_mismatch of each of ``records``, in their order, hashing up to ``threads`` files at once
    (default hash_threads()): hashlib releases the GIL, so checking the shards of a large extraction
    (a resume, ``open(verify=True)``) runs at the speed of the cores and the disk, not of one core.
    Each result, and each error (a read error names its shard), comes when the records before it have
    come, as from one record_mismatch after another; hashes not yet started when the caller stops
    (at an error, or Ctrl-C) are not started."""
    # First what stat tells, in order (cheap): the problem, None where the size matches, or the error
    # of stat, raised when its turn comes.
    found: list[str | StoreError | None] = []
    for record in records:
        path = os.path.join(directory, record["file"])
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            found.append("missing")
        except OSError as e:
            error = os_error(e, f"reading shard {record['index']}", path)
            error.__cause__ = e  # as raise ... from e would set it
            found.append(error)
        else:
            found.append(None if size == record["bytes"] else f"{size} bytes, expected {record['bytes']}")
    hashed = [check_sha256 and problem is None for problem in found]
    digests = sha256_shards([(os.path.join(directory, r["file"]), r["index"])
                             for r, h in zip(records, hashed) if h], threads)
    try:
        for record, problem, h in zip(records, found, hashed):
            if isinstance(problem, StoreError):
                raise problem
            if h and next(digests) != record["sha256"]:
                problem = "sha256 differs"
            yield problem
    finally:
        digests.close()


def usable_cores() -> int:
    """The cores this process may run on (its affinity), shared with the other processes of this node
    under torchrun (LOCAL_WORLD_SIZE); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        pass  # not torchrun's: this process has the cores to itself
    return max(1, cores)


def hash_threads() -> int:
    """Threads that hash shards at once when checking them: usable_cores(), at most 8."""
    return min(8, usable_cores())


def sha256_shards(items: Sequence[tuple[str, int]], threads: int | None = None) -> Iterator[str]:
    """The sha256 of each (path, shard index) of ``items``, in order, hashed by up to ``threads`` threads
    at once (default hash_threads()); a read error is a StoreError naming the shard, raised in order.
    Closing the generator early cancels the hashes not yet started and waits for those running."""
    threads = hash_threads() if threads is None else threads
    if threads <= 1 or len(items) <= 1:
        for path, index in items:
            yield _sha256_of_shard(path, index)
        return
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(items)),
                                               thread_name_prefix="residtap-hash") as pool:
        pending = iter(items)
        window: collections.deque = collections.deque()  # submitted, in order: at most 2 per thread
        try:
            while True:
                while len(window) < 2 * threads and (item := next(pending, None)) is not None:
                    window.append(pool.submit(_sha256_of_shard, *item))
                if not window:
                    return
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


def _sha256_of_shard(path: str, index) -> str:
    """sha256_file, with a read error (a bad sector: EIO) said as one StoreError naming the shard."""
    try:
        return sha256_file(path)
    except OSError as e:
        raise os_error(e, f"reading shard {index}", path) from e


def _describes(directory: str, record: dict) -> bool:
    try:
        return record_mismatch(directory, record) is None
    except StoreError:
        return False


# ---------------------------------------------------------------------------------------- reading
def read_header(path: str) -> tuple[dict, int]:
    """The safetensors header of ``path`` and the byte offset where its data starts.

    Format (safetensors spec): 8-byte little-endian header length N, N bytes of JSON mapping each
    name to {dtype, shape, data_offsets: [begin, end]} relative to the data start, then the data.
    """
    try:
        with builtins.open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ShardCorruptError(f"shard {path!r} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise ShardCorruptError(f"shard {path!r} has an implausible header length {n}")
            text = f.read(n)
    except OSError as e:
        raise os_error(e, "reading the shard", path) from e
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardCorruptError(f"shard {path!r} has a damaged safetensors header ({e})") from e
    return header, 8 + n


class _Shard:
    """One shard file, memory-mapped lazily (copy-on-write: never modifies the file). The mapping
    keeps no file descriptor open (torch.from_file closes it once mapped; numpy's memmap, through
    Python's mmap, keeps one per file), so an extraction of thousands of shards can be mapped whole
    under the usual limit of 1024 open files."""

    def __init__(self, path: str, record: dict):
        self.path, self.record = path, record
        self.header, self.data_start = read_header(path)
        self._map = None

    def __getstate__(self) -> dict:
        # Pickled (a DataLoader worker started by spawn or forkserver, the default on macOS and, from
        # Python 3.14, on Linux), an open memory map would travel as a copy of the whole file: every shard
        # the parent had read, in every worker. The path and header are enough; the worker maps it again.
        return {**self.__dict__, "_map": None}

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.header:
            raise KeyError(f"{name!r} is not in shard {self.path!r}")
        if self._map is None:  # private (copy-on-write), read-only opened, paged in as read
            self._map = torch.from_file(self.path, shared=False, size=os.path.getsize(self.path),
                                        dtype=torch.uint8)
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        raw = self._map[self.data_start + begin:self.data_start + end]
        if (self.data_start + begin) % dtype.itemsize:  # (safetensors aligns what it writes)
            raw = raw.clone()  # a tensor at an unaligned offset: its bytes, copied
        return raw.view(dtype).view(info["shape"])


class LayerArray:
    """One captured output at one residual index, over all shards: ``[n_rows, d_model]`` (stats and
    per-row columns: ``[n_rows]``). Memory-mapped; indexing reads only the rows asked for.

    ``a[i]``, ``a[i:j]``, ``a[index_tensor]`` return tensors (copies); ``a.shards`` the per-shard
    memory-mapped tensors; ``len(a)``, ``a.shape``, ``a.dtype``. Usable as a map-style torch Dataset.
    """

    def __init__(self, shards: list[_Shard], name: str):
        self.name = name
        self._shards = shards
        self._parts: list[torch.Tensor | None] = [None] * len(shards)
        lengths = [int(s.header[name]["shape"][0]) for s in shards]
        self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        first = shards[0].header[name]
        self.dtype = _DTYPES[first["dtype"]]
        self.shape = (int(self._offsets[-1]), *first["shape"][1:])

    def __getstate__(self) -> dict:
        # The per-shard tensors are views of the shards' memory maps: pickled, they would be copies of
        # the data (see _Shard.__getstate__), so they are left out and made again where unpickled.
        return {**self.__dict__, "_parts": [None] * len(self._parts)}

    def part(self, k: int) -> torch.Tensor:
        if self._parts[k] is None:
            self._parts[k] = self._shards[k].tensor(self.name)
        return self._parts[k]

    @property
    def shards(self) -> list[torch.Tensor]:
        return [self.part(k) for k in range(len(self._shards))]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        n = len(self)
        if isinstance(idx, tuple):  # rows, then within them, as numpy and torch index
            if not idx:
                return self[slice(None)]
            rows = self[idx[0]]
            one_row = rows.dim() == len(self.shape) - 1
            return rows[idx[1:] if one_row else (slice(None), *idx[1:])]
        if isinstance(idx, torch.Tensor) and idx.dim() == 0 and not idx.dtype.is_floating_point \
                and not idx.dtype.is_complex and idx.dtype != torch.bool:
            idx = int(idx)  # a 0-d integer index: the row it holds
        elif isinstance(idx, np.ndarray) and idx.ndim == 0 and idx.dtype.kind in "iu":
            idx = int(idx)
        if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range for {n} rows")
            i %= n
            k = int(np.searchsorted(self._offsets, i, side="right") - 1)
            return self.part(k)[i - int(self._offsets[k])].clone()
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(n))  # the selected rows only, not all n first
        if isinstance(idx, list) and not idx:
            idx = np.zeros(0, dtype=np.int64)  # (np.asarray([]) is float64)
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx)
        if idx.dtype == bool or idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise IndexError(f"expected an int, a slice or a 1-D integer index (then, in a tuple, indices within "
                             f"the rows), got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = idx % max(n, 1)
        out = torch.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        for k in np.unique(which):
            sel = np.nonzero(which == k)[0]
            local = torch.from_numpy(idx[sel] - self._offsets[k])
            out[torch.from_numpy(sel)] = self.part(int(k))[local]
        return out

    def to_tensor(self) -> torch.Tensor:
        """All rows in memory: ``torch.cat`` of the shards."""
        return torch.cat(self.shards) if self._shards else torch.empty(self.shape, dtype=self.dtype)

    def __repr__(self) -> str:
        return (f"LayerArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, "
                f"shards={len(self._shards)})")


class Activations:
    """An extraction on disk, read memory-mapped. Made by :func:`open_activations` (``residtap.open``).

    ::

        acts = residtap.open("acts/")
        acts.layer_ids, acts.outputs, acts.d_model, acts.n_rows
        x = acts.layer(6)                 # LayerArray [n_rows, d_model] of resid at residual index 6
        x[:1024]                          # a tensor
        acts.column("seq_index")          # [n_rows]: which sequence each row is from (also "position")
        loader = torch.utils.data.DataLoader(acts.dataset(6, batch_size=4096), batch_size=None)
    """

    def __init__(self, path: str, *, verify: bool = False, allow_partial: bool = False):
        if not os.path.isdir(path):
            raise StoreError(f"{path!r} is not a directory holding a residtap extraction")
        paths = manifest_paths(path)
        if not paths:
            raise StoreError(f"{path!r} holds no {MANIFEST}: not a residtap extraction (or none has started)")
        manifests = [read_json(p) for p in paths]
        self.path = path
        self.manifest = manifests[0]
        complete = bool(self.manifest.get("complete", False))
        if complete:  # rank parts left by a merge that was killed before deleting them: superseded
            manifests = manifests[:1]
        if not complete and not allow_partial:
            raise StoreError(f"the extraction in {path!r} is not complete (its manifest says "
                             f"complete=false); run the same extract command again to finish it, or pass "
                             "allow_partial=True to read the shards complete so far")
        self.complete = complete
        self.records = [r for _, r in sorted(merged_records(manifests, path).items())]
        self.settings = self.manifest["settings"]
        self.layer_ids: list[int] = list(self.settings["layer_ids"])
        self.outputs: tuple[str, ...] = tuple(self.settings["outputs"])
        self.d_model: int = int(self.manifest["d_model"])
        self._shards = []
        for r in self.records:
            p = os.path.join(path, r["file"])
            if not os.path.exists(p):
                raise ShardCorruptError(f"shard {r['index']} ({p!r}) is listed in the manifest but missing")
            size = os.path.getsize(p)
            if size != r["bytes"]:
                raise ShardCorruptError(f"shard {r['index']} ({p!r}) has {size} bytes, the manifest says "
                                        f"{r['bytes']}: the file is truncated or was replaced")
            shard = _Shard(p, r)
            # The shard's own header says which it is: a file swapped for another of the same size
            # is caught without hashing.
            own = json.loads(shard.header.get("__metadata__", {}).get("residtap", "{}"))
            if "shard" in own and (own["shard"], own.get("seq_start")) != (r["index"], r.get("seq_start")):
                raise ShardCorruptError(f"shard {r['index']} ({p!r}) is shard {own['shard']} (from "
                                        f"sequence {own.get('seq_start')}) by its own header: the file was "
                                        "replaced or renamed")
            self._shards.append(shard)
        if verify:
            self.verify()
        self._arrays: dict[str, LayerArray] = {}

    @property
    def n_rows(self) -> int:
        return sum(int(r["n_rows"]) for r in self.records)

    @property
    def n_shards(self) -> int:
        return len(self.records)

    @property
    def tensor_names(self) -> list[str]:
        return self._shards[0].names() if self._shards else []

    def verify(self) -> None:
        """Hash every shard (several at once, see sha256_shards) and compare with the manifest;
        ShardCorruptError names the first that differs."""
        digests = sha256_shards([(s.path, s.record["index"]) for s in self._shards])
        with contextlib.closing(digests):
            for s, got in zip(self._shards, digests):
                if got == s.record["sha256"]:
                    continue
                raise ShardCorruptError(
                    f"shard {s.record['index']} ({s.path!r}) fails its checksum: sha256 {got}, the manifest "
                    f"says {s.record['sha256']}. The file is corrupted; delete it and run the same extract "
                    "command again to recompute it")

    def _array(self, name: str) -> LayerArray:
        if not self._shards:
            raise StoreError(f"the extraction in {self.path!r} has no complete shard yet")
        if name not in self._arrays:
            self._arrays[name] = LayerArray(self._shards, name)
        return self._arrays[name]

    def layer(self, layer_id: int, output: str = "resid") -> LayerArray:
        """Rows of ``output`` ("resid", "delta", "normed", or a stat: "mean", "rstd", "l2", "maxabs") at
        residual index ``layer_id``: ``[n_rows, d_model]`` (stats ``[n_rows]``)."""
        stored = [o for o in self.outputs if o != "stats"] + (
            ["mean", "rstd", "l2", "maxabs"] if "stats" in self.outputs else [])
        if output not in stored:
            raise ValueError(f"output: expected one of {stored} (what this extraction holds), got {output!r}")
        if layer_id not in self.layer_ids:
            raise ValueError(f"layer_id: expected one of the extracted residual indices {self.layer_ids}, "
                             f"got {layer_id!r}")
        return self._array(tensor_name(output, layer_id))

    def column(self, name: str) -> LayerArray:
        """A per-row column: "seq_index" (global sequence index) or "position" (in the sequence)."""
        if name not in ROW_TENSORS:
            raise ValueError(f"name: expected one of {ROW_TENSORS}, got {name!r}")
        return self._array(name)

    def sequences(self, name: str = "input_ids") -> torch.Tensor:
        """Per-sequence tensors of all shards, concatenated: "input_ids" [n_seqs, seq_len], "source"
        [n_seqs, 2], "attention_mask" (padded inputs)."""
        if name not in SEQ_TENSORS:
            raise ValueError(f"name: expected one of {SEQ_TENSORS}, got {name!r}")
        if self._shards and name not in self.tensor_names:
            raise ValueError(f"name: {name!r} is not stored in this extraction (packing="
                             f"{self.settings.get('packing')!r}; 'attention_mask' is stored for padded "
                             "inputs)")
        return self._array(name).to_tensor()

    def dataset(self, layers, output: str = "resid", *, batch_size: int | None = None,
                shuffle: bool = True, seed: int = 0, buffer_size: int | str = "1GiB",
                drop_last: bool = False, rank: int | None = None,
                world_size: int | None = None) -> "ShuffledRows":
        """A torch IterableDataset of rows for SAE training — see :class:`ShuffledRows`."""
        return ShuffledRows(self, layers, output, batch_size=batch_size, shuffle=shuffle, seed=seed,
                            buffer_size=buffer_size, drop_last=drop_last, rank=rank,
                            world_size=world_size)

    def __repr__(self) -> str:
        return (f"Activations({self.path!r}, layers={self.layer_ids}, outputs={self.outputs}, "
                f"rows={self.n_rows}, shards={self.n_shards}, complete={self.complete})")


class ShuffledRows(torch.utils.data.IterableDataset):
    """Rows in random order, reading a few shards at a time (sequential reads, bounded memory).

    Each epoch: shuffle the shard order, cut the rows in that order into windows of ``buffer_size``
    bytes (of the rows asked for: the other layers and outputs in a shard are not read), then for each
    window load its rows, shuffle them together, and yield them — one row ``[d_model]``
    (``[len(layers), d_model]`` for a list of layers) at a time, or ``[batch_size, ...]`` batches
    (faster; use DataLoader(batch_size=None)). A window is the one place rows mix, and its rows come
    from ``buffer_size / (row bytes × seq_len)`` consecutive sequences or so: 1 GiB (the default) of
    width-4096 bfloat16 rows is 128 sequences of 1024 tokens. Each process (each DataLoader worker)
    holds one window and the batch it is filling. ``set_epoch(e)`` changes the order; the same seed
    and epoch give the same order.

    With DataLoader workers, the epoch's shard order is cut into one run of rows per worker, at
    batch boundaries, so that each worker reads only its own rows and only the last yields a short
    batch: ``len()`` is what the loader yields in all, and ``drop_last`` drops fewer than
    ``batch_size`` rows, with or without workers. (Which rows share a window then depends on the
    number of workers.) ``set_epoch`` reaches persistent workers too: the epoch is kept in shared
    memory.

    Data parallel (DistributedDataParallel): ``rank`` and ``world_size`` (e.g. torch.distributed's)
    give each process its own share of every epoch, the same seed on all: the epoch's order is cut
    into ``world_size`` equal runs of ``len(rows) // world_size`` rows, one per rank (then among its
    workers as above), so that every rank yields as many rows and batches, which DDP's collectives
    need. The fewer than ``world_size`` rows left at the end of an epoch's order are left out of it;
    the order changes with the epoch, so they are other rows the next time.
    """

    def __init__(self, acts: Activations, layers, output="resid", *, batch_size=None, shuffle=True,
                 seed=0, buffer_size="1GiB", drop_last=False, rank=None, world_size=None):
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError(f"rank, world_size: expected both or neither, got rank={rank!r} and "
                             f"world_size={world_size!r}")
        self.world_size = positive_int(1 if world_size is None else world_size, "world_size")
        rank = 0 if rank is None else rank
        if not (is_int(rank) and 0 <= rank < self.world_size):
            raise ValueError(f"rank: expected an int in [0, world_size = {self.world_size}), got {rank!r}")
        self.rank = int(rank)
        self.single = isinstance(layers, (int, np.integer))
        layers = [int(layers)] if self.single else list(layers)
        if not layers:
            raise ValueError("layers: expected a residual index or a non-empty list of them, got []")
        self.arrays = [acts.layer(lid, output) for lid in layers]
        batch_size = positive_int(batch_size, "batch_size", none_ok=True)
        self.buffer_size = parse_size(buffer_size, "buffer_size")
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, int(seed), drop_last
        row_bytes = sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in self.arrays)
        self._window_rows = max(1, self.buffer_size // row_bytes)
        # Shared memory: DataLoader's workers (persistent ones included) read what set_epoch wrote.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        if not is_int(epoch) or not 0 <= epoch < 2**63:
            raise ValueError(f"epoch: expected an int in [0, 2**63), got {epoch!r}")
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        n = len(self.arrays[0]) // self.world_size  # this rank's rows
        if self.batch_size is None:
            return n
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _window(self, pieces) -> torch.Tensor:
        """The rows of ``pieces`` ((shard, first row, end row) each), copied into one tensor (for a list
        of layers, ``[rows, len(layers), ...]``) and nothing else allocated."""
        first = self.arrays[0]
        shape = (sum(b - a for _, a, b in pieces), *(() if self.single else (len(self.arrays),)),
                 *first.shape[1:])
        out, at = torch.empty(shape, dtype=first.dtype), 0
        for k, a, b in pieces:
            for j, arr in enumerate(self.arrays):
                (out if self.single else out[:, j])[at:at + b - a] = arr.part(k)[a:b]
            at += b - a
        return out

    def _windows(self, pieces) -> Iterator[list]:
        """``pieces`` cut into runs of ``_window_rows`` rows (the last may be shorter), a piece split
        where a window ends."""
        window, room = [], self._window_rows
        for k, a, b in pieces:
            while a < b:
                take = min(room, b - a)
                window.append((k, a, a + take))
                a, room = a + take, room - take
                if not room:
                    yield window
                    window, room = [], self._window_rows
        if window:
            yield window

    def _my_rows(self, order: list) -> list:
        """(shard, first row, end row) pieces, in ``order``, of this worker's run of the epoch's rows:
        this rank's run (all of them in one process); with W workers, worker w's share of its
        batches, cut where a batch ends (a shard may be split between two workers or ranks)."""
        lengths = [int(n) for n in np.diff(self.arrays[0]._offsets)]
        info = torch.utils.data.get_worker_info()
        if info is None and self.world_size == 1:
            return [(k, 0, lengths[k]) for k in order]
        n = len(self.arrays[0]) // self.world_size
        start = self.rank * n  # this rank's run: rows [start, start + n) of the epoch's order
        lo, hi = start, start + n
        if info is not None:
            bs = self.batch_size or 1
            n_batches, workers = math.ceil(n / bs), info.num_workers
            per, extra = divmod(n_batches, workers)
            first_batch = info.id * per + min(info.id, extra)
            lo = start + first_batch * bs
            hi = start + min(n, (first_batch + per + (info.id < extra)) * bs)
        pieces, at = [], 0  # at: the epoch's row where shard k starts
        for k in order:
            a, b = max(lo, at), min(hi, at + lengths[k])
            if a < b:
                pieces.append((k, a - at, b - at))
            at += lengths[k]
        return pieces

    def __iter__(self) -> Iterator[torch.Tensor]:
        # (seed, epoch) mixed into one 64-bit seed: no two pairs share an order by arithmetic (as
        # seed * k + epoch would make seed 0 at epoch k repeat seed 1 at epoch 0), and none overflows.
        mixed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        g = torch.Generator().manual_seed(int(mixed))
        n_shards = len(self.arrays[0]._shards)
        order = torch.randperm(n_shards, generator=g).tolist() if self.shuffle else list(range(n_shards))
        pieces = self._my_rows(order)
        bs, carry, held = self.batch_size, [], 0  # carry: the parts of the batch being filled
        for window in self._windows(pieces):
            rows = take = None  # the last window let go before the next is read: one held, not two
            rows = self._window(window)  # a copy: never hand out views of the file mapping
            n = len(rows)
            take = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            if bs is None:  # one row at a time: views of the window, which is so held once too
                yield from (rows[i] for i in take.tolist())
                continue
            # Batches gathered from the window one at a time, so that it is held once, not twice; the
            # rows a window leaves over start the next window's first batch (joined once it is full,
            # however many windows smaller than a batch fill it).
            at = 0
            if held:
                at = min(n, bs - held)
                carry.append(rows[take[:at]])
                held += at
                if held < bs:
                    continue
                yield torch.cat(carry)
                carry, held = [], 0
            while n - at >= bs:
                yield rows[take[at:at + bs]]
                at += bs
            if at < n:
                carry, held = [rows[take[at:]]], n - at
        if held and not self.drop_last:
            yield carry[0] if len(carry) == 1 else torch.cat(carry)


def open_activations(path: str | os.PathLike, *, verify: bool = False,
                     allow_partial: bool = False) -> Activations:
    """Open an extraction directory (``residtap.open``). Shard sizes are always checked against the
    manifest; ``verify=True`` also checks every shard's sha256 (reads everything once). A run not
    finished yet (its manifest says ``complete: false``) is refused unless ``allow_partial=True``,
    which reads the shards complete so far."""
    return Activations(os.fspath(path), verify=verify, allow_partial=allow_partial)
