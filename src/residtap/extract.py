"""Extraction at scale: stream captured activations to disk at forward speed, resumable, multi-process.

    residtap.extract("random:gpt2-small", "tokens.npy", "acts/", layers=[0, 6, 12], seq_len=128)
    residtap extract --model PATH --data corpus.jsonl --out acts/ --seq-len 1024 --dtype bfloat16
    torchrun --nproc-per-node 8 -m residtap extract ...          # data parallel, one merged manifest

The pipeline, per batch (two Capture objects alternate, so one can be copied out while the other fills)::

    reader thread:   the next shards' sequences, read and tokenized up to two shards ahead (ReadAhead)
    compute stream:  [wait: slot k free] forward with Capture k → event F
    copy stream:     [wait F] D2H of every captured tensor into a pinned host shard buffer → event C_k
    writer threads:  [wait the shard's last C] safetensors file under a temporary name (the host
                     buffer is free again here) → fsync
    publisher threads: sha256 of the written file, while its writer fsyncs it → [wait: fsynced]
                     rename → manifest (by default up to twice as many as writers, where there are
                     cores for them: hashing costs more per byte than writing, and this way it holds
                     no host buffer)

Capture k's buffers are overwritten by its next forward only after C_k (the compute stream waits on
it), so no copy ever reads half-overwritten data; ``record_stream`` keeps buffers freed by a shape
change alive until the copy stream is done with them. On CPU the copy is a plain ``copy_`` and the
rest is identical. Host memory is bounded: the shard buffers (and, for padded inputs, the writers'
compacted copies) fit in ``host_memory``; at most ``writers + 1`` buffers exist.

A model dispatched over several GPUs (``device_map``) is captured on each layer's own device; each
device then has its own copy stream and its own events F and C_k, and the writers wait for every
device's C.

Shards are fixed groups of whole batches (``seqs_per_shard`` sequences), so a shard's bytes depend
only on its sequences: a killed run resumes by skipping the shards its manifest lists, and with N
processes rank r computes shards r, r+N, ... — the same files a single process writes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import operator
import os
import queue
import re
import signal
import sys
import threading
import time

import numpy as np
import torch
from torch import nn

from . import backend as _backend
from . import inputs as _inputs
from . import store as _store
from .arch import _get_path, bare_model, max_positions, module_device, resolve_layout
from .capture import Capture
from .cli import say
from .reference import OUTPUTS, STAT_NAMES
from .selection import (LAST, NOT_GIVEN, KeepMask, is_int, parse_size, positive_int, resolve_device,
                        resolve_dtype, resolve_positions)

# ------------------------------------------------------------------------------------------ settings
def default_publishers(writers: int) -> int:
    """Publisher threads for ``writers`` writer threads when the caller does not say: twice as many
    where this process has the cores (sha256 runs at about half the speed of a write from memory,
    and each thread hashes one shard at a time), never fewer than the writers. The cores are those
    this process may run on, shared with the other processes of this node under torchrun
    (LOCAL_WORLD_SIZE), less one per writer and one for the forwards."""
    return max(writers, min(2 * writers, _store.usable_cores() - writers - 1))


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    """How the pipeline runs (validated at construction; ``ValueError`` names the argument)."""

    batch_size: int = 8
    seq_len: int | None = None
    packing: str = "pack"
    max_tokens: int | None = None
    shard_size: int = 1 << 30  # bytes of activations per shard (rounded to whole batches, at least one)
    host_memory: int = 8 << 30  # bytes of host shard buffers, at most
    writers: int = 2
    publishers: int | None = None  # None: default_publishers(writers run)
    verify_existing: bool = True

    def __post_init__(self):
        for name, none_ok in (("batch_size", False), ("writers", False), ("publishers", True),
                              ("seq_len", True), ("max_tokens", True)):
            object.__setattr__(self, name, positive_int(getattr(self, name), name, none_ok=none_ok))
        if self.packing not in _inputs.PACKINGS:
            raise ValueError(f"packing: expected one of {_inputs.PACKINGS}, got {self.packing!r}")


@dataclasses.dataclass
class ExtractResult:
    """What a call to :func:`extract` did (for this process; ``manifest`` is the directory's)."""

    out: str
    complete: bool
    n_shards: int  # in the whole extraction
    shards_written: int  # by this process in this call
    shards_skipped: int  # already complete before this call (resume)
    n_tokens: int  # input tokens forwarded by this call
    n_rows: int  # captured rows written by this call
    bytes_written: int
    seconds: float  # from the first forward to the last shard durable
    waits: dict  # seconds, by what on: "model", "input", "disk", "d2h", "write", "hash" (see _Waits)
    manifest: dict
    writers: int = 0  # writer threads this call ran (fewer than asked where host_memory is short)
    publishers: int = 0  # publisher threads (hash, rename, record) this call ran
    # shards_written, shards_skipped, n_tokens, n_rows, bytes_written summed over every process of
    # the run (torchrun), and seconds the longest; this process's own where it ran alone
    all_processes: dict = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


def _positions_rule(p):
    """The positions setting as JSON (manifest): "all", an int, "start:stop:step" or a list."""
    if p is None:
        return "all"
    if isinstance(p, slice):
        return f"{'' if p.start is None else p.start}:{'' if p.stop is None else p.stop}:" \
               f"{'' if p.step is None else p.step}"
    if isinstance(p, str):
        return p
    if is_int(p):
        return int(p)
    return [operator.index(x) for x in p]  # numpy ints, 0-d tensors


def model_identity(model: nn.Module) -> dict:
    """The config's sha256 (without version/path keys) and a cheap weights fingerprint (each
    parameter's name, shape, dtype and first 64 values): enough to tell two models apart on resume."""
    cfg = getattr(model, "config", None)
    cfg_d = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    for k in ("transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype",
              "_attn_implementation_autoset", "_commit_hash"):
        cfg_d.pop(k, None)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if p.device.type != "meta":
            h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    p0 = next(model.parameters())
    return {"model_config_sha256": hashlib.sha256(json.dumps(cfg_d, sort_keys=True, default=str).encode())
            .hexdigest(), "model_weights_fingerprint": h.hexdigest(), "model_dtype": str(p0.dtype)[6:]}


def load_model(spec: str, *, dtype=None, device="cpu", seed: int = 0, device_map=None):
    """``random:SIZE[,key=value...]`` (a seeded random GPT-2, no download) or a local HF model
    (directory or cached name, loaded offline). Returns (model, name, tokenizer or None)."""
    if spec.startswith("random:"):
        from .models import random_gpt2

        size, *pairs = spec[len("random:"):].split(",")
        overrides = {}
        for pair in pairs:
            k, eq, v = pair.partition("=")
            if not eq or not k:
                raise ValueError(f"model: expected 'random:SIZE[,key=value...]', got {spec!r}")
            try:
                overrides[k.strip()] = float(v) if "." in v else int(v)
            except ValueError:
                raise ValueError(f"model: expected 'random:SIZE[,key=value...]' with int or float values, "
                                 f"got {pair!r} in {spec!r}") from None
        model = random_gpt2(size, seed=seed, dtype=dtype or torch.float32, device=device, **overrides)
        return model, f"{spec} (random init, seed {seed})", None
    from transformers import AutoTokenizer

    from .models import load_pretrained_as

    kw = {"device_map": device_map} if device_map else {}
    model = load_pretrained_as(spec, "model:", ", or random:gpt2-small", dtype=dtype or "auto", **kw)
    if not device_map:
        model = model.to(device)
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception:  # a model without a tokenizer is fine for token-id inputs
        tok = None
    return model.eval(), spec, tok


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"tokenizer: {path!r} could not be loaded offline ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e


# ------------------------------------------------------------------------------------------ pipeline
class _Waits:
    """Seconds spent, by what on: the main thread on the model ("model": in its forward, and on CUDA
    waiting for the GPU before queueing the next one), blocked for the next block of input ("input":
    the reader thread, reading and tokenizing, is behind) or blocked for a free host buffer ("disk":
    the writers are behind); the writer threads blocked on a device-to-host copy ("d2h") or busy
    writing ("write", summed); the publisher threads busy hashing and renaming written shards ("hash",
    summed). What the main thread spent on none of these is extract's own work between forwards."""

    def __init__(self):
        self.t = {"model": 0.0, "input": 0.0, "disk": 0.0, "d2h": 0.0, "write": 0.0, "hash": 0.0}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def on(self, what: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.t[what] += time.perf_counter() - t0


# transformers' causal-mask code (5.17 to 5.24 at least), called with position ids, no attention mask
# and no cache, as every forward extract makes of a packed input is, checks whether the position ids
# hold several packed sequences (a jump other than +1) with a host read of a device flag: a sync
# inside every forward, which keeps the host from queueing the next batch ahead of the GPU. The model
# builds its position ids itself there (extract passes none): consecutive, so that check always finds
# one sequence per row and returns None. The "async" way (_Run.mask_sync, an experiment) runs the same
# check on the device without reading it back, as an asynchronous assertion that stops the run (a
# device-side assert) should it ever fail, and returns that None: the same mask, the same bits.
_PACKED_CHECK = threading.local()  # .on: this thread's forward is one of extract's, without a mask
_PACKED_PATCH = {"depth": 0, "original": None}
_PACKED_PATCH_LOCK = threading.Lock()


def _packed_check_on_device(position_ids: torch.Tensor):
    """Stands in for transformers.masking_utils.find_packed_sequence_indices while a run that asked for
    it is on (the original, for every other caller and thread, and while compiling)."""
    original = _PACKED_PATCH["original"]
    if not getattr(_PACKED_CHECK, "on", False) or torch.compiler.is_compiling():
        return original(position_ids)
    steps = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    torch._assert_async((steps == 1).all(), "residtap extract (mask_sync='async'): the model's position ids "
                        "are not consecutive, so the mask it would have made differs; run without it")
    return None


@contextlib.contextmanager
def _packed_check_patched():
    """While inside, transformers' packed-sequence check goes through _packed_check_on_device (which
    defers to the original unless this thread's _PACKED_CHECK.on is set). Changes nothing where
    transformers has no such check."""
    try:
        import transformers.masking_utils as mu
    except ImportError:
        mu = None
    with _PACKED_PATCH_LOCK:
        found = mu is not None and (_PACKED_PATCH["depth"] > 0
                                    or callable(getattr(mu, "find_packed_sequence_indices", None)))
        if found:
            if _PACKED_PATCH["depth"] == 0:
                _PACKED_PATCH["original"] = mu.find_packed_sequence_indices
                mu.find_packed_sequence_indices = _packed_check_on_device
            _PACKED_PATCH["depth"] += 1
    try:
        yield
    finally:
        if found:
            with _PACKED_PATCH_LOCK:
                _PACKED_PATCH["depth"] -= 1
                if _PACKED_PATCH["depth"] == 0:  # "original" stays: a thread that looked up the
                    mu.find_packed_sequence_indices = _PACKED_PATCH["original"]  # stand-in just now


@contextlib.contextmanager
def _mask_check_on_device(on: bool = True):
    """This thread's forwards inside check their position ids on the device (see _PACKED_CHECK); a
    no-op with ``on`` false."""
    if not on:
        yield
        return
    with _packed_check_patched():
        was = getattr(_PACKED_CHECK, "on", False)
        _PACKED_CHECK.on = True
        try:
            yield
        finally:
            _PACKED_CHECK.on = was


_HOST_ALIGN = 512  # bytes: where each layer's buffer starts inside a shard's one host allocation


def _host_layout(specs: dict, n_layers: int, rows: int) -> tuple[list[tuple[str, int, int]], int]:
    """Where each (name, layer) buffer of a shard lies in its one allocation: [(name, offset, bytes)] in
    name, then layer order, each offset aligned to _HOST_ALIGN; and the bytes in all."""
    place, total = [], 0
    for name, (tail, dt) in specs.items():
        n = rows * math.prod(tail) * torch.empty((), dtype=dt).element_size()
        for _ in range(n_layers):
            place.append((name, total, n))
            total += -(-n // _HOST_ALIGN) * _HOST_ALIGN
    return place, total


def _host_shard_bytes(specs: dict, n_layers: int, rows: int, pinned: bool) -> int:
    """Host bytes of one shard buffer. Pinned memory comes from torch's caching host allocator, which
    rounds each request up to a power of two: count that, so host_memory really bounds the total. One
    request per shard, not one per layer and output, rounds once: a shard within a power-of-two
    shard_size (the default 1GiB) pins no more than shard_size."""
    total = _host_layout(specs, n_layers, rows)[1]
    return 1 << (total - 1).bit_length() if pinned and total > 1 else total


class _HostShard:
    """Host buffers for one shard: per stored tensor name, per layer, ``[rows, ...]``; views into one
    allocation (pinned on CUDA; see _host_shard_bytes)."""

    def __init__(self, specs: dict, n_layers: int, rows: int, pin: bool):
        place, total = _host_layout(specs, n_layers, rows)
        self.memory = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        self.out: dict[str, list[torch.Tensor]] = {name: [] for name in specs}
        for name, offset, n in place:
            tail, dt = specs[name]
            self.out[name].append(self.memory[offset:offset + n].view(dt).view(rows, *tail))
        self.block: _inputs.Block | None = None
        self.rows = 0
        self.events: list = []  # CUDA: one per copy stream (device), after this shard's last copy


class _Manifest:
    """The manifest this process keeps up to date: manifest.json (one process) or its rank part."""

    def __init__(self, out: str, header: dict, records: dict[int, dict], rank: int, world: int,
                 data_changed: bool = False):
        self.out, self.header, self.records = out, header, records
        self.rank, self.world = rank, world
        # The input's contents changed since the extraction started (_check_compatible): until rank 0
        # records its first shard, manifest.json still holds the old fingerprint (_still_this_run).
        self.data_changed = data_changed
        # This rank's part lists every shard that was done when the run started, from whichever
        # manifest recorded it, and those it finishes: a resumed run rewrites its part, and must not
        # drop the shards an earlier run finished, whichever rank now owns them (the owner under a
        # new process count may not write its part before a kill). merged_records removes repeats.
        self.mine: dict[int, dict] = dict(records)
        # The shards this process's manifest lists (records or mine), each record encoded once: a
        # rewrite after every shard then costs a join, not an encoding of every record, which held
        # the GIL (and so stalled the forwards) for longer the more shards there were.
        self._lines = {i: _store.json_line(r) for i, r in (records if world == 1 else self.mine).items()}
        self._lock = threading.Lock()
        self._first = threading.Lock()  # this rank's publishers, one at a time until its first record
        self._recorded = False  # whether this rank's part lists a shard this run recorded

    @contextlib.contextmanager
    def recording(self, pending: _store.PendingShard):
        """Around publishing a shard (its rename: it is hashed before) and recording it. A rank other than
        0 of a multi-process run does both for its first shard under the run's record lock, and only
        while manifest.json still holds this run's settings: rank 0, failing before any shard of a run
        that started the directory was recorded, takes the run back under that lock (_take_back), and a
        shard published or recorded after that would be a part or a shard file without a manifest, which
        a rerun refuses. Once this rank's part lists a shard, rank 0 finds it there and keeps everything;
        no lock is needed. Where the lock cannot be had it checks all the same: rank 0 takes nothing back
        without it."""
        if self.world == 1 or self.rank == 0 or self._recorded:
            yield
            return
        with self._first:
            fd = None if self._recorded else _store.lock_records(self.out)
            try:
                if (refused := self.taken_back(pending.index)) is not None:
                    _store.discard_shard(pending)
                    raise refused
                yield
                self._recorded = True
            finally:
                if fd is not None:
                    os.close(fd)

    def taken_back(self, index: int) -> _store.StoreError | None:
        """The error of a rank other than 0 that finds its run taken back before it recorded a shard
        (about to record shard ``index``, or failing to write it because the directory has gone)."""
        if self.world == 1 or self.rank == 0 or self._recorded or self._still_this_run():
            return None
        return _store.StoreError(f"out: {self.out!r} no longer holds this run's manifest: rank 0 failed before "
                                 f"any shard was recorded and took it back (rank 0's error says why); rank "
                                 f"{self.rank} stops without recording shard {index}")

    def _still_this_run(self) -> bool:
        """Whether manifest.json is there with this run's settings (not taken back, nor since replaced
        by another run's, which a rerun started once rank 0 had let the directory go would write)."""
        try:
            m = _store.read_json(os.path.join(self.out, _store.MANIFEST))
        except _store.StoreError:
            return False
        have, want = m.get("settings", {}), self.header["settings"]
        if self.data_changed:
            have, want = _without_content(have), _without_content(want)
        return not _store.settings_difference(have, want)

    def path(self) -> str:
        return os.path.join(self.out, _store.MANIFEST if self.world == 1 else _store.part_name(self.rank))

    def add(self, record: dict) -> None:
        line = _store.json_line(record)
        with self._lock:
            self.records[record["index"]] = record
            self.mine[record["index"]] = record
            self._lines[record["index"]] = line
            self._write(complete=False)

    def _write(self, complete: bool, **extra) -> None:
        lines = self._lines
        _store.write_json_atomic(self.path(), {**self.header, **extra, "complete": complete},
                                 shard_lines=list(map(lines.__getitem__, sorted(lines))))


def _fmt_waits(waits: dict, elapsed: float, label: str, n_writers: int, n_publishers: int) -> str:
    e = max(elapsed, 1e-9)
    return (f"wait {label} {100 * waits['model'] / e:.0f}% input {100 * waits['input'] / e:.0f}% "
            f"disk {100 * waits['disk'] / e:.0f}% "
            f"d2h {100 * waits['d2h'] / (e * n_writers):.0f}% | writers busy "
            f"{100 * waits['write'] / (e * n_writers):.0f}% publishers hashing "
            f"{100 * waits['hash'] / (e * n_publishers):.0f}%")


def _keeps_training_modes(fn):
    """``extract`` runs a module it is given in eval mode; each of its submodules gets back the mode
    it had (a model extracted from in the middle of training goes on training with its dropout),
    whether extract returned or raised."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
        try:
            return fn(model, *args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training
    return wrapper


@_keeps_training_modes
def extract(model, data, out, *, layers=None, positions=None, outputs=("resid",), dtype=None,
            batch_size: int = 8, seq_len: int | None = None, max_tokens: int | None = None,
            packing: str = "pack", tokenizer=None, text_field: str | None = None, split: str | None = None,
            shard_size="1GiB", host_memory="8GiB", writers: int = 2, publishers: int | None = None,
            device=None, model_dtype=None, seed: int = 0, device_map=None, backend: str | None = None,
            overlap: bool = False, model_name: str | None = None, progress: bool | None = None,
            verify_existing: bool = True, rank: int | None = None,
            world_size: int | None = None, blocks=NOT_GIVEN, final_norm=NOT_GIVEN) -> ExtractResult:
    """Run ``model`` over ``data`` and write the captured activations to ``out`` (shards + manifest).

    ``model``: an nn.Module (HF causal LM or bare model), ``"random:gpt2-small[,n_layer=2,...]"``,
    or a local HF model path / cached name (loaded offline). ``data``: a .npy of token ids (1-D stream
    or 2-D ``[n, seq_len]``), a .txt (one document per line) or .jsonl (``text_field``, default
    "text") file, a saved HF dataset directory (its ``input_ids`` column, else ``text_field``; a
    ``text_field`` given is tokenized even where it has ``input_ids``), or an array/tensor of ids.
    ``layers``, ``positions``, ``outputs``, ``dtype`` select what is captured, as in
    :func:`residtap.capture`. ``max_tokens`` stops after the first ``ceil(max_tokens / seq_len)``
    sequences. ``packing``: "pack" (concatenate documents, cut into ``seq_len``) or "pad" (a document
    per sequence, right-padded; padding rows are not stored).

    Writes ``out/manifest.json`` and ``out/shard-NNNNNN.safetensors``; read them back with
    :func:`residtap.open`. Running the same call again after a crash resumes after the complete
    shards; a directory holding another model's or settings' extraction is refused
    (ManifestMismatchError). Under ``torchrun`` (or with ``rank``/``world_size``) each process writes
    the shards ``i`` with ``i % world_size == rank`` and rank 0 merges one manifest at the end. A
    model dispatched over several devices (``device_map``) is captured on each layer's device and
    copied out from there; its inputs go to the device its embeddings compute on. ``device_map``
    (``"auto"``, ``"balanced"``, a dict, ...) loads a model given by name that way (accelerate);
    ``device`` then does not apply. ``blocks``/``final_norm``: as in :func:`residtap.capture`, paths
    relative to ``model`` as given or loaded (for a model type residtap's table lacks; recorded in the
    manifest's settings where given). ``overlap``: as in :func:`residtap.capture` (CUDA: each
    layer's capture on a side stream beside the next blocks); it changes no stored byte, so a run
    may resume with either. ``writers``: threads writing shards, each with one host buffer of
    ``shard_size`` (fewer where ``host_memory`` is short). ``publishers``: threads that hash, rename
    and record the written shards (default :func:`default_publishers`: up to twice the writers, as
    the cores allow). Neither changes a stored byte.

    Example::

        res = residtap.extract("random:gpt2-small", ids_npy, "acts/", layers=[6], seq_len=128)
        acts = residtap.open("acts/")
        acts.layer(6)[:10]        # [10, 768]
    """
    opts = ExtractOptions(batch_size=batch_size, seq_len=seq_len, packing=packing, max_tokens=max_tokens,
                          shard_size=parse_size(shard_size, "shard_size"),
                          host_memory=parse_size(host_memory, "host_memory"), writers=writers,
                          publishers=publishers, verify_existing=verify_existing)
    resolve_device(device, "device")  # None, cpu or a CUDA device this machine has
    rank, world, local_rank = _dist_env(rank, world_size)
    if device_map is not None and (not isinstance(model, str) or device is not None or world > 1):
        raise ValueError(f"device_map: only applies to a model given by name or path, without device "
                         f"and without torchrun (one process spreads the model itself), got "
                         f"device_map={device_map!r} with model={type(model).__name__}, device={device!r}, "
                         f"world_size={world}")
    if isinstance(model, str) and device_map is not None:
        model, name, model_tok = load_model(model, dtype=resolve_dtype(model_dtype, "model_dtype"),
                                            seed=seed, device_map=device_map)
    elif isinstance(model, str):
        dev = device or _default_device(local_rank, world)
        if world > 1 and dev == "cuda":  # one GPU per process, as torchrun numbers them
            dev = f"cuda:{local_rank % torch.cuda.device_count()}"
        model, name, model_tok = load_model(model, dtype=resolve_dtype(model_dtype, "model_dtype"),
                                            device=dev, seed=seed)
    elif isinstance(model, nn.Module):
        name, model_tok = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "")
                                            or type(model).__name__), None
        if model_dtype is not None or device is not None:
            raise ValueError("model_dtype, device: only apply when model is a name or path; move or "
                             "convert the module yourself (model.to(device, dtype))")
    else:
        raise ValueError(f"model: expected an nn.Module, 'random:SIZE' or a local HF model path, got "
                         f"{type(model).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(os.fspath(tokenizer))
    tokenizer = tokenizer if tokenizer is not None else model_tok
    model.eval()

    # Captures hook the bare model, which is what runs (no LM head: its logits are not needed).
    base = bare_model(model)
    # blocks= / final_norm= as Capture takes them, paths relative to the model as given; the captures
    # of the bare model get the modules they name
    given = {k: v for k, v in (("blocks", blocks), ("final_norm", final_norm)) if v is not NOT_GIVEN}
    explicit = {}
    if given:
        layout = resolve_layout(model, **given)
        explicit = {"blocks": list(layout.blocks), "final_norm": layout.final_norm}
    probe = Capture(base, layers, positions, dtype, outputs, backend=backend,  # validates the selection
                    overlap=overlap, **explicit)
    cfg = probe.config
    if isinstance(cfg.positions, KeepMask):
        raise ValueError("positions: a bool mask fixes one batch's shape; extract takes None, an int, a "
                         "slice, a list of ints or 'last' (each sequence's last real token)")
    max_pos = max_positions(model)
    source = _inputs.open_source(data, seq_len=opts.seq_len, packing=opts.packing,
                                 max_tokens=opts.max_tokens,
                                 tokenizer=tokenizer, text_field=text_field, split=split,
                                 default_seq_len=min(1024, int(max_pos or 1024)))
    seq_len = source.seq_len
    if isinstance(source, _inputs.DocumentSource):
        source.warn_if_glued()
        if (vocab := _vocab_size(base)) is not None:
            source.fit_pad(vocab)
    if max_pos is not None and seq_len > max_pos and _learned_positions(base, max_pos):
        raise ValueError(f"seq_len: expected at most {max_pos} (the model's max_position_embeddings / "
                         f"n_positions: its learned position table ends there), got {seq_len}")
    if cfg.positions == LAST:
        pos, n_pos = None, 1  # per sequence, from its mask (see _Run._rows)
    else:
        plan = resolve_positions(cfg.positions, seq_len)  # ValueError if a position is out of range
        pos = np.asarray(plan.index if plan.index is not None else range(plan.span.start, plan.span.stop))
        n_pos = len(pos)

    first = next(model.parameters())
    # Inputs go where the embeddings compute: with device_map / offloading (accelerate) the first
    # parameter may be on another device or on "meta"; accelerate's hooks move them on from there.
    in_device = _input_device(model, first.device)
    d_model = probe._guess_d_model()  # the final norm's width, else the (text) config's, else the embeddings'
    if d_model is None:
        raise ValueError(f"model: could not tell the residual width of {type(model).__name__} (no final norm "
                         "weight, config.hidden_size or input embeddings)")
    cap_dtype = cfg.dtype or first.dtype
    L = len(cfg.layer_ids)
    specs = {}  # stored tensor name → (shape after rows, dtype)
    for o in ("resid", "delta", "normed"):
        if o in cfg.outputs:
            specs[o] = ((d_model,), cap_dtype)
    if "stats" in cfg.outputs:
        for s in STAT_NAMES:
            specs[s] = ((), torch.float32)
    row_bytes = sum(L * math.prod(t) * torch.empty((), dtype=dt).element_size() for t, dt in specs.values())
    seq_bytes = n_pos * row_bytes
    batches_per_shard = max(1, opts.shard_size // (seq_bytes * opts.batch_size))
    seqs_per_shard = batches_per_shard * opts.batch_size
    shard_bytes = _host_shard_bytes(specs, L, seqs_per_shard * n_pos, pinned=in_device.type == "cuda")
    if opts.packing == "pad" and cfg.positions != LAST:  # a writer compacts the real-token rows: a copy
        shard_bytes += _host_shard_bytes(specs, L, seqs_per_shard * n_pos, pinned=False)
    n_buffers = min(opts.writers + 1, opts.host_memory // shard_bytes)
    if n_buffers < 2:
        raise ValueError(f"host_memory: a shard of {seqs_per_shard} sequences takes {shard_bytes} bytes of "
                         "host buffers and the pipeline needs at least 2 shard buffers (one filling while "
                         f"one is written), but the budget is {opts.host_memory} bytes; raise it, or lower "
                         "the shard size or the batch size")

    settings = {"model": name, **model_identity(model), "layer_ids": list(cfg.layer_ids),
                "outputs": list(cfg.outputs), "dtype": str(cap_dtype)[6:],
                "positions": _positions_rule(cfg.positions), "seq_len": seq_len, "packing": opts.packing,
                "batch_size": opts.batch_size, "seqs_per_shard": seqs_per_shard,
                "max_tokens": opts.max_tokens, "data": source.describe(),
                # only where given: the settings of runs that name neither stay as they were
                **{k: _module_names(model, v) for k, v in given.items()}}
    import transformers
    import safetensors

    from . import __version__
    header = {"format": _store.FORMAT, "format_version": _store.FORMAT_VERSION, "settings": settings,
              "versions": {"residtap": __version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "safetensors": safetensors.__version__},
              # Where the numbers were computed: a GPU and the CPU (or the compiled op and the
              # reference, whose l2 may differ by an ulp) give different bytes for the same settings.
              "environment": {"device": in_device.type,
                              "backend": _backend.choose(cfg.backend, in_device).name},
              "d_model": d_model, "positions_per_sequence": n_pos,
              "tensors": {"activations": "<output>.<layer_id> [rows, d_model] (stats: [rows] float32)",
                          # what the shards hold: attention_mask only where sequences are padded
                          "per_row": list(_store.ROW_TENSORS),
                          "per_sequence": [t for t in _store.SEQ_TENSORS
                                           if t != "attention_mask" or opts.packing == "pad"]}}

    out = os.fspath(out)
    if not out:
        raise ValueError("out: expected a directory path, got ''")
    # A run that fails before its first shard in a directory it started takes its manifest back
    # (else the corrected command would find "another extraction" there): rank 0 decides, for every
    # process of the run (_take_back). made_dir: the top-most directory this run makes (its parents
    # too, where they are missing), which it then removes again; None where out exists.
    made_dir = _first_missing(out)
    if not made_dir and not os.path.isdir(out):
        # Said here, as the other unusable directories are: listing it below would fail with a bare
        # NotADirectoryError, reported as an unexpected error with its traceback.
        raise _store.StoreError(f"out: {out!r} exists and is not a directory; choose a new or empty "
                                "directory for the extraction")
    if not made_dir:  # a manifest that is not residtap's: refused before anything (the lock) is made there
        for p in _store.manifest_paths(out):
            try:
                _store.read_json(p)
            except _store.StoreError as e:
                raise _store.StoreError(f"out: {out!r} holds a {os.path.basename(p)} that residtap cannot "
                                        f"resume ({e}); choose a new or empty directory") from None
    fresh = rank == 0 and (made_dir or not _store.manifest_paths(out))
    group = _init_group(world)
    lock = None
    try:
        # From here to the end of go(), the command line's SIGTERM and Ctrl-C wait for a checkpoint (_Signals)
        with _SIGNALS.deferred():
            if rank == 0:  # one run at a time in a directory (its other ranks are this run)
                _make_dir(out)
                lock = _store.lock_directory(out)
            records, complete, data_changed = _prepare_dir(out, header, rank, world, group,
                                                           opts.verify_existing,
                                                           functools.partial(_canonical_settings, model))
            if complete:
                m = _store.read_json(os.path.join(out, _store.MANIFEST))
                nothing = {"shards_written": 0, "shards_skipped": len(records), "n_tokens": 0, "n_rows": 0,
                           "bytes_written": 0}  # this process, and the run as a whole: every shard done
                return ExtractResult(out=out, complete=True, n_shards=m.get("n_shards", len(records)),
                                     seconds=0.0, waits=_Waits().t, manifest=m, **nothing,
                                     all_processes={**nothing, "seconds": 0.0})
            header = _with_history(out, header)
            # Every process has read the directory before any goes on: rank 0, failing, may take the run
            # back (_take_back), and another still reading it then would fail on a missing file, unclearly.
            _barrier(group, out)
            manifest = _Manifest(out, header, records, rank, world, data_changed=bool(data_changed))
            run = _Run(base, probe.layout, cfg, source, opts, specs, pos, n_pos, seqs_per_shard, n_buffers,
                       manifest, rank, world, progress, in_device)
            try:
                if data_changed:
                    _check_inputs_everywhere(run, data_changed, group)
                run.go()
                # The window ends before its last check (not after: a signal noted in between would be
                # taken nowhere): one noted during the threads' last shards is taken here; from here on
                # one acts at once.
                _SIGNALS.undefer()
            except BaseException as e:
                if fresh and not manifest.records:
                    _take_back(out, made_dir, world)
                elif isinstance(e, ValueError) and manifest.records and e.args and isinstance(e.args[0], str):
                    # bad input met mid-run (a malformed record, a token id outside the vocabulary): say
                    # what is kept, and that correcting it is not starting over (check_finished_inputs)
                    n = _n_kept(out)  # every rank's, not this one's alone
                    e.args = (f"{e.args[0].rstrip('.')}. {out!r} keeps its {n} complete "
                              f"shard{'s' if n != 1 else ''}: once the input is corrected, the same command "
                              "resumes after them", *e.args[1:])
                raise
        final, everyone = _finish(out, header, manifest, run, rank, world, group)
    finally:
        if lock is not None:
            _tidy_if_nothing_there(out, made_dir)  # before the lock is let go (see lock_directory)
            os.close(lock)
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(group)
    return ExtractResult(out=out, complete=final.get("complete", False),
                         n_shards=final.get("n_shards", run.n_blocks), shards_written=run.written,
                         shards_skipped=run.skipped, n_tokens=run.n_tokens, n_rows=run.n_rows,
                         bytes_written=run.bytes, seconds=run.seconds, waits=dict(run.waits.t),
                         manifest=final, writers=run.n_writers, publishers=run.n_publishers,
                         all_processes=everyone)


def _module_names(model: nn.Module, given):
    """blocks= / final_norm= for the manifest: a path as given, None, or the modules' names in ``model``."""
    if given is None or isinstance(given, str):
        return given
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(given, nn.Module) and not isinstance(given, (nn.ModuleList, nn.Sequential)):
        return names.get(id(given), type(given).__name__)
    if id(given) in names:
        return names[id(given)]
    return [names.get(id(m), type(m).__name__) for m in given]


def _learned_positions(base: nn.Module, max_pos: int) -> bool:
    """Whether the model looks positions up in a learned table (GPT-2's wpe, OPT's embed_positions:
    an embedding other than the tokens' with max_pos rows, or OPT's max_pos + 2), which a longer
    sequence overruns; rotary and other computed positions run past the config's value."""
    try:
        tokens = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        tokens = None
    return any(isinstance(m, nn.Embedding) and m is not tokens
               and max_pos <= m.num_embeddings <= max_pos + 2 for m in base.modules())


def _dist_env(rank, world_size):
    if (rank is None) != (world_size is None):
        raise ValueError("rank, world_size: pass both or neither (torchrun sets RANK and WORLD_SIZE)")
    if rank is None:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not (is_int(world_size) and is_int(rank) and 0 <= rank < world_size):
        raise ValueError(f"rank, world_size: expected ints with 0 <= rank < world_size, got {rank!r}, "
                         f"{world_size!r}")
    rank, world_size = int(rank), int(world_size)
    return rank, world_size, int(os.environ.get("LOCAL_RANK", rank))


def _default_device(local_rank: int, world: int) -> str:
    if torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}" if world > 1 else "cuda"
    return "cpu"


def _init_group(world: int):
    """A gloo group for the two barriers of a multi-process run (CPU tensors: no NCCL needed). Ranks
    may finish far apart after a resume, so the timeout is long."""
    if world == 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ValueError("world_size > 1 needs torchrun (MASTER_ADDR/MASTER_PORT unset): "
                             "torchrun --nproc-per-node N -m residtap extract ...")
        # Joining waits in C++ (gloo connecting to every rank, for the timeout below), where no Python
        # handler runs: a rank that a Ctrl-C or SIGTERM ended before it joined would leave the others
        # waiting there through the same signal, to torchrun's SIGKILL 30 s later (seen in a Ctrl-C
        # timing fuzz). Before extract's window nothing needs cleaning up: the default actions end them.
        with _SIGNALS.default_actions():
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))


def _barrier(group, out: str) -> None:
    if group is not None:
        import torch.distributed as dist

        _together(lambda: dist.barrier(group=group), out)


def _together(collective, out: str):
    """``collective()``, a collective of the run's group, whose failure means a rank is gone (gloo:
    "Connection closed by peer"). Either the SIGTERM that torchrun sent every worker ended it at a
    checkpoint (a resume's check of its shards) while this rank waited here with the same SIGTERM noted:
    that, the cause, is taken; or it failed on its own (bad input met in its shards) before torchrun's
    SIGTERM reached this one: a StoreError says so and what ``out`` keeps, rather than the collective's
    error (a traceback, exit status 3) that reads as this rank's fault."""
    try:
        return collective()
    except RuntimeError as e:
        raise _peer_gone(e, out) from e


def _peer_gone(e: RuntimeError, out: str) -> _store.StoreError:
    """What a failed collective (``e``) means here: the SIGTERM noted, if one was (raised); else the
    StoreError to raise (see _together)."""
    import torch.distributed as dist

    _SIGNALS.check()
    rank = dist.get_rank()  # (this process's: known without the peers)
    n = _n_kept(out)
    kept = (f"{out!r} keeps its {n} complete shard{'s' if n != 1 else ''} and nothing partial" if n else
            "no shard was complete yet")
    # gloo's "[.../pair.cc:561] Connection closed by peer [host]:port. This is typically ...": its first sentence
    said = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip()).split(". ")[0].splitlines()[0] if str(e).strip() \
        else type(e).__name__
    return _store.StoreError(f"rank {rank}: another process of this run stopped while this one waited for it "
                             f"(its own error says why; here: {said}); {kept}. Once that is mended, the "
                             "same command resumes")


def _n_kept(out: str) -> int:
    """How many complete shards ``out`` lists now, over every rank's manifest (0 without one)."""
    try:
        return len(_store.merged_records([_store.read_json(p) for p in _store.manifest_paths(out)]))
    except (OSError, _store.StoreError):  # no directory (the run took it back, or never made it)
        return 0


def _check_inputs_everywhere(run: "_Run", changed: list[str], group) -> None:
    """run.check_finished_inputs in every process of the run, and no process computes anything unless
    every one found its finished shards' inputs unchanged: else one rank's refusal would come while the
    others wrote shards of the changed input beside the finished ones."""
    error = None
    try:
        run.check_finished_inputs(changed)
    except BaseException as e:  # noqa: BLE001 — raised below, once the other processes know
        error = e
    if group is not None:
        import torch.distributed as dist

        failed = torch.tensor([error is not None], dtype=torch.int32)
        try:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
        except RuntimeError as e:
            if error is None:
                raise _peer_gone(e, run.manifest.out) from e
        if error is None and failed.item():
            raise _store.ManifestMismatchError(
                f"data: another process of this run could not match its finished shards in "
                f"{run.manifest.out!r} to the changed input (its error says why); nothing was computed")
    if error is not None:
        raise error


def _prepare_dir(out: str, header: dict, rank: int, world: int, group, verify: bool, canonical):
    """Create or check ``out``; return (complete records, whether the extraction is already complete, how
    the input's contents changed since it was started: see _check_compatible, which ``canonical`` is
    passed to).

    Rank 0 (which has made the directory and taken its lock) writes the initial manifest before any
    other rank looks at it.
    """
    if rank == 0:
        existing = _store.manifest_paths(out)
        if not existing:
            foreign = [f for f in os.listdir(out)
                       if not (f.startswith(".shard-") or f in ("manifest.json.tmp", _store.LOCK))]
            if foreign:
                raise _store.StoreError(f"out: {out!r} is not empty ({len(foreign)} entries, e.g. "
                                        f"{sorted(foreign)[:3]}) and holds no residtap manifest; refusing to "
                                        "write there: choose a new or empty directory")
            _store.write_json_atomic(os.path.join(out, _store.MANIFEST), {**header, "complete": False,
                                                                           "shards": []})
        changed = _check_compatible(out, header, canonical, speak=True)
        _reopen_if_shards_missing(out)
    _barrier(group, out)
    if rank != 0:
        changed = _check_compatible(out, header, canonical, speak=False)
    manifests = [_store.read_json(p) for p in _store.manifest_paths(out)]
    if manifests[0].get("complete"):
        _SIGNALS.undefer()  # nothing to clean up; checking every shard can take long: signals act at once
        _barrier(group, out)  # every rank has read the manifests before rank 0 removes superseded parts
        if rank == 0:
            _store.open_activations(out, verify=verify)  # sizes always; sha256 unless told not to
            for p in _store.manifest_paths(out)[1:]:  # parts a killed merge left: superseded
                os.remove(p)
        return _store.merged_records(manifests[:1]), True, changed
    records = _store.merged_records(manifests, out)
    owned = lambda i: i % world == rank  # noqa: E731
    mine = [i for i in sorted(records) if owned(i)]
    # (hashed several at once; each result comes in order, and a Ctrl-C stops the hashing)
    problems = _store.record_mismatches(out, [records[i] for i in mine], check_sha256=verify)
    with contextlib.closing(problems):
        for i, problem in zip(mine, problems):
            _SIGNALS.check()
            if problem == "missing":  # deleted by hand (e.g. after a checksum error): recompute it
                say(f"residtap extract: shard {i} is listed but missing; it will be recomputed")
                del records[i]
            elif problem is not None:
                raise _store.ShardCorruptError(
                    f"shard {i} ({os.path.join(out, records[i]['file'])!r}) does not match the manifest "
                    f"({problem}): the file is corrupted. Delete it and run the same command again to "
                    "recompute it.")
    _store.remove_stale_temporaries(out, owned)
    return records, False, changed


def _first_missing(out: str) -> str | None:
    """The top-most directory of the path ``out`` that does not exist yet (what _make_dir creates:
    ``out`` itself where its parent exists), or None where ``out`` exists."""
    path, top = os.path.abspath(out), None
    while not os.path.lexists(path):
        top, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


def _remove_made(out: str, made_dir: str) -> None:
    """``out`` and the parents of it up to ``made_dir`` (what this run made), each only if empty."""
    path = os.path.abspath(out)
    while True:
        os.rmdir(path)  # OSError where not empty: the caller stops there
        if path == made_dir or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def _make_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _store.os_error(e, "creating the output directory", out) from e


# How long rank 0, failing, waits for the record lock: another rank holds it while it publishes and
# records its first shard (a rename and two fsyncs: it hashes the shard first), never while waiting for
# anything else.
_TAKE_BACK_WAIT = 60.0


def _take_back(out: str, made_dir: str | None, world: int) -> None:
    """Rank 0 failed before it recorded any shard of a run that started ``out`` (or found it without a
    manifest): take the run back (_abandon) where no process of it has recorded a shard, so that the
    corrected command finds nothing in the way; else keep everything a resume needs.

    One process: its threads have stopped, so what it recorded is all there is. Several: the others
    go on until they fail or torchrun ends them, and cannot be asked (a collective now could wait on a
    dead process). So rank 0 decides from their parts on disk, under the run's record lock, and takes
    the run back by removing manifest.json: another rank publishes and records its first shard only
    under that lock and only while manifest.json is there (_Manifest.recording), so either rank 0 sees
    its part or it never publishes, and no part or shard without a manifest can appear afterwards.

    What is left as it was: where the lock cannot be had (no flock on the directory, as on some network
    file systems, or another rank holding it past _TAKE_BACK_WAIT), the run keeps its manifest, which
    a rerun with other settings refuses, saying to delete the directory. The same where only another
    rank fails and rank 0 is ended without coming here: torchrun ends it with SIGTERM, which the command
    line takes at rank 0's next checkpoint (_Signals) and so comes here, but the Python API installs no
    handler, and a rank 0 waiting in a collective then, or in a batch for longer than torchrun's grace
    period (30 s), gets its SIGKILL. The failing rank cannot take the run back itself (only rank 0 knows
    whether the run started the directory, and rank 0 records its shards without the lock, its decision
    coming after its own). Temporaries another
    rank writes after the take-back stay if torchrun ends it before it removes them (hidden files,
    which a rerun ignores and removes; they keep a directory the run made from being removed)."""
    if world == 1:
        _abandon(out, made_dir)
        return
    fd = _store.lock_records(out, timeout=_TAKE_BACK_WAIT)
    if fd is None:
        return
    try:
        if not any(_store.read_json(p).get("shards") for p in _store.manifest_paths(out)):
            _abandon(out, made_dir, owns=lambda index: index % world == 0)
    except _store.StoreError:  # a manifest it cannot read: keep everything; the run's error is raised
        pass
    finally:
        os.close(fd)


def _abandon(out: str, made_dir: str | None, owns=lambda index: True) -> None:
    """Undo what a failed first run wrote before any shard was recorded: its manifest (and rank parts,
    listing nothing), the temporaries of the shards ``owns`` says are this process's (another rank's
    may be being written) and any shard renamed into place whose record was never written (the
    directory held nothing else when the run began), and the directory if it made it. Best effort: the
    run's own error is what the caller raises."""
    try:
        _store.remove_stale_temporaries(out, owns)
        for f in os.listdir(out):
            if _store.SHARD_FILE.fullmatch(f) or f.startswith(_store.PART_PREFIX):  # parts, their temporaries
                os.remove(os.path.join(out, f))
        os.remove(os.path.join(out, _store.MANIFEST))
        if made_dir:
            _remove_made(out, made_dir)
    except OSError:
        pass


def _tidy_if_nothing_there(out: str, made_dir: str | None) -> None:
    """After a run that leaves no manifest (it failed before writing one, or took it back): its lock
    file, and the directory if the run made it and it is empty."""
    try:
        if _store.manifest_paths(out):
            return
        os.remove(os.path.join(out, _store.LOCK))
        if made_dir:
            _remove_made(out, made_dir)
    except OSError:
        pass


def _reopen_if_shards_missing(out: str) -> None:
    """A complete extraction some of whose shard files were deleted (what the checksum error advises)
    is marked incomplete again, so that this run recomputes them; a corrupted file that is still
    there stays an error (ShardCorruptError, from the check of complete extractions)."""
    path = os.path.join(out, _store.MANIFEST)
    m = _store.read_json(path)
    if not m.get("complete"):
        return
    missing = [r["file"] for r in m["shards"] if not os.path.exists(os.path.join(out, r["file"]))]
    if missing:
        say(f"residtap extract: {len(missing)} shard(s) of the complete extraction in {out!r} are missing "
            f"(e.g. {missing[0]!r}); they will be recomputed")
        _store.write_json_atomic(path, {k: v for k, v in m.items() if k not in ("n_shards", "totals")}
                                 | {"complete": False})


def _with_history(out: str, header: dict) -> dict:
    """``header`` for this run's manifest writes. Resuming an extraction that has shards, it keeps the
    versions and environment the extraction was started with and lists, under "resumed_with", every
    other (versions, environment) that has run on it since (this one included), so that the manifest
    never states one place for shards computed in several."""
    manifests = [_store.read_json(p) for p in _store.manifest_paths(out)]
    if not any(m.get("shards") for m in manifests):
        return header
    started = manifests[0]
    history = list(started.get("resumed_with", []))
    now = {"versions": header["versions"], "environment": header["environment"]}
    if now != {"versions": started["versions"], "environment": started["environment"]} and now not in history:
        history.append(now)
    return {**header, "versions": started["versions"], "environment": started["environment"],
            **({"resumed_with": history} if history else {})}


def _without_content(settings: dict) -> dict:
    """``settings`` without what fingerprints the input's contents (inputs.CONTENT_KEYS)."""
    data = settings.get("data")
    if not isinstance(data, dict):
        return settings
    return {**settings, "data": {k: v for k, v in data.items() if k not in _inputs.CONTENT_KEYS}}


def _canonical_settings(model: nn.Module, settings: dict) -> dict:
    """``settings`` as a resume compares them: what makes the shards' bytes, not how it was written.
    Without the model's name or path (its identity is its config hash and weights fingerprint) and the
    input's path (its identity is its fingerprint) or its tokenizer's path; positions as the indices
    they select at seq_len (-1 and 15 at length 16, "all" and "0:16"); blocks and final_norm as the
    names of the modules they are in ``model`` (the family's when a run did not name them)."""
    s = dict(settings)
    s.pop("model", None)
    data = s.get("data")
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "path"}
        if isinstance(data.get("tokenizer"), dict):
            data["tokenizer"] = {k: v for k, v in data["tokenizer"].items() if k != "name_or_path"}
        s["data"] = data
    s["positions"] = _selected_positions(s.get("positions"), s.get("seq_len"))
    for key in ("blocks", "final_norm"):
        s[key] = _named_modules(model, key, s.get(key, NOT_GIVEN))
    return s


def _selected_positions(rule, seq_len):
    """A manifest's positions rule ("all", an int, "a:b:c", a list, "last") as the indices it selects
    at ``seq_len``; the rule itself where it selects by mask ("last") or cannot be read."""
    if rule == LAST or not is_int(seq_len):
        return rule
    try:  # the rule's strings ("all", "a:b:c") read as the command line reads --positions
        plan = resolve_positions(_parse_ints(rule, "positions") if isinstance(rule, str) else rule, seq_len)
    except (ValueError, TypeError):
        return rule
    return plan.index if plan.index is not None else list(range(plan.span.start, plan.span.stop))


def _named_modules(model: nn.Module, key: str, value):
    """blocks= / final_norm= as recorded (a path, names, None, or absent: the family's) → the names
    of the modules in ``model``; the value itself where it does not resolve."""
    try:
        if value is NOT_GIVEN:
            layout = resolve_layout(model)
            value = list(layout.blocks) if key == "blocks" else layout.final_norm
        elif isinstance(value, str):
            value = _get_path(model, value, key)
        else:
            return value
    except ValueError:
        return None if value is NOT_GIVEN else value
    if isinstance(value, (nn.ModuleList, nn.Sequential)):
        value = list(value)
    return _module_names(model, value)


def _adopt_same_run(out: str, header: dict, have: dict, canonical, speak: bool) -> bool:
    """Where ``have`` (the settings of ``out``'s manifest) differ from this run's only in how they were
    written (the model or the input at another path, positions -1 rather than 15, blocks named as the
    family's), this run takes the directory's settings as its own (the input's contents as it finds
    them), says so once, and True; else nothing changes and False."""
    h, w = _without_content(have), _without_content(header["settings"])
    if h == w or canonical(h) != canonical(w):
        return False
    data = header["settings"].get("data")
    content = {k: v for k, v in data.items() if k in _inputs.CONTENT_KEYS} if isinstance(data, dict) else {}
    adopted = {**have, "data": {**have["data"], **content}} if isinstance(have.get("data"), dict) else dict(have)
    if speak:
        say(f"residtap extract: {out!r} was started with the same model, input and settings, written "
            f"otherwise ({'; '.join(_store.settings_difference(h, w))}); resuming it with its own")
    header["settings"] = adopted
    return True


def _check_compatible(out: str, header: dict, canonical, speak: bool) -> list[str]:
    """Refuse ``out`` if an extraction with other settings is there; the same settings written
    otherwise are the same run, whose settings this run takes from the directory's first manifest
    (_adopt_same_run, said when ``speak``; ``canonical``: settings as a resume compares them). Returns
    how the input's contents changed since (empty if they did not) where that alone differs, the
    extraction is not complete and every finished shard recorded its input's digest: the run then
    checks those shards' inputs against the input as it is now before it computes anything
    (_Run.check_finished_inputs)."""
    changed: list[str] = []
    for k, p in enumerate(_store.manifest_paths(out)):
        have = _store.read_json(p)
        diff = _store.settings_difference(have["settings"], header["settings"])
        if diff and k == 0 and _adopt_same_run(out, header, have["settings"], canonical, speak):
            diff = _store.settings_difference(have["settings"], header["settings"])
        if diff and _store.settings_difference(_without_content(have["settings"]),
                                               _without_content(header["settings"])):
            empty = ("" if have.get("shards") else " It holds no shard yet: if no other run is writing there "
                     "(one killed before its first shard leaves this), delete the directory and run again.")
            raise _store.ManifestMismatchError(
                f"out: {out!r} holds an extraction made with different settings ({os.path.basename(p)}): "
                + "; ".join(diff) + ". Nothing was written. Use a new --out directory, or the same settings "
                "to resume." + empty)
        if diff:  # the input's contents alone
            old, new = have["settings"].get("data", {}), header["settings"]["data"]
            brief = lambda v: f"{v[:12]}…" if isinstance(v, str) and len(v) > 16 else json.dumps(v)  # noqa: E731
            what = [f"{k} {brief(old.get(k))} -> {brief(new.get(k))}"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if have.get("complete"):
                raise _store.ManifestMismatchError(
                    f"data: {out!r} holds a complete extraction of an input that has changed since "
                    f"({'; '.join(what)}). Nothing was written. Use a new --out directory, or the input as "
                    "it was.")
            if not all("input_sha256" in r for r in have.get("shards", [])):
                raise _store.ManifestMismatchError(
                    f"data: the input has changed since {out!r} was started ({'; '.join(what)}), and its "
                    f"manifest ({os.path.basename(p)}) was written by a residtap that did not record each "
                    "shard's input digest, so its finished shards cannot be checked against the input as it "
                    "is now. Nothing was written. Use a new --out directory, or the input as it was.")
            changed += [w for w in what if w not in changed]
        for key in ("versions", "environment"):
            if have.get(key) != header[key]:
                say(f"residtap extract: warning: {out!r} was started with {key} {have.get(key)}, "
                    f"resuming with {header[key]}; shards may not be byte-identical across them")
    return changed


def _finish(out, header, manifest: _Manifest, run: "_Run", rank, world, group) -> tuple[dict, dict]:
    """Mark the extraction complete: one process writes manifest.json; with several, each writes its
    part and rank 0 merges them once all are done. Returns the final manifest and what the run did,
    summed over its processes."""
    n = run.n_blocks
    counts = {"shards_written": run.written, "shards_skipped": run.skipped, "n_tokens": run.n_tokens,
              "n_rows": run.n_rows, "bytes_written": run.bytes}
    everyone = {**counts, "seconds": run.seconds}
    if group is not None:
        import torch.distributed as dist

        summed = torch.tensor(list(counts.values()), dtype=torch.int64)
        longest = torch.tensor([run.seconds], dtype=torch.float64)
        _together(lambda: dist.all_reduce(summed, group=group), out)
        _together(lambda: dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group), out)
        everyone = {**dict(zip(counts, summed.tolist())), "seconds": float(longest)}
    if world > 1:
        with manifest._lock:
            manifest._write(complete=False, done=True, n_shards=n)
        _barrier(group, out)
    final = {}
    if rank == 0:
        paths = _store.manifest_paths(out)
        records = _store.merged_records([_store.read_json(p) for p in paths], out)
        missing = [i for i in range(n) if i not in records]
        if missing:
            raise _store.StoreError(f"the extraction in {out!r} is missing shards {missing[:10]} after all "
                                    "processes finished; run the same command again")
        shards = [records[i] for i in range(n)]
        totals = {k: sum(int(r[k]) for r in shards) for k in ("n_seqs", "n_tokens", "n_rows", "bytes")}
        final = {**header, "complete": True, "n_shards": n, "totals": totals, "shards": shards}
        _store.write_json_atomic(os.path.join(out, _store.MANIFEST), final)
        for p in paths:
            if os.path.basename(p) != _store.MANIFEST:
                os.remove(p)
        for f in os.listdir(out):  # a part being rewritten when a run with more processes was killed
            if f.startswith(_store.PART_PREFIX) and f.endswith(".json.tmp"):
                os.remove(os.path.join(out, f))
    _barrier(group, out)
    if rank != 0:
        final = _store.read_json(os.path.join(out, _store.MANIFEST))
    return final, everyone


class _CudaQueues:
    """The asynchronous side of the pipeline on CUDA: per device a copy stream, ordered against the
    compute stream (the device's current stream) by events, with no host sync. _Run talks to it
    only through these methods, so tests can put a CPU emulation in its place (see _queues_for)."""

    def __init__(self, device: torch.device):
        # The model's device has a copy stream from the start; another device gets one at its
        # first copy (a model dispatched over several).
        self.streams = {device: torch.cuda.Stream(device)}

    def handles(self, device: torch.device) -> bool:
        """Whether a layer captured on ``device`` is copied asynchronously (else copied at once)."""
        return device.type == "cuda"

    def compute_done(self, device: torch.device):
        """An event after the work queued so far on ``device``'s compute stream (the forward)."""
        return _recorded(torch.cuda.current_stream(device))

    def compute_waits(self, device: torch.device, event) -> None:
        """``device``'s compute stream runs what comes next only after ``event``."""
        torch.cuda.current_stream(device).wait_event(event)

    def copy(self, device: torch.device, after, pairs) -> object:
        """Copy each (device src, host dst) of ``pairs`` on ``device``'s copy stream once ``after``
        has happened; returns the event after the copies."""
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = torch.cuda.Stream(device)
        stream.wait_event(after)
        with torch.cuda.stream(stream):
            for src, dst in pairs:
                # The buffers belong to the compute stream's allocator pool: keep them alive
                # until this stream is done even if the next forward reallocates (shape change).
                src.record_stream(stream)
                dst.copy_(src, non_blocking=True)
        return _recorded(stream)

    def copies_done(self) -> list:
        """Events after everything queued so far on every copy stream: a host buffer is complete
        once they have all happened (the writers ``synchronize`` them)."""
        return [_recorded(stream) for stream in self.streams.values()]


def _recorded(stream):
    """A new event recorded on ``stream``: it happens once what is queued there so far has run.
    Blocking: a thread that synchronizes on it sleeps rather than spins, leaving its core to the
    publishers' hashing, which bounds extraction to fast storage."""
    event = torch.cuda.Event(blocking=True)
    event.record(stream)
    return event


def _queues_for(device: torch.device) -> _CudaQueues | None:
    """The asynchronous copy machinery for a run on ``device``; None on the CPU (copies are made as
    soon as a forward returns)."""
    return _CudaQueues(device) if device.type == "cuda" else None


class _Run:
    """One process's pass over its shards: forwards, copies, writer threads, progress."""

    # When a forward's copies to the host are queued on CUDA (the copy stream waits for the forward's
    # end either way): "return", as soon as the forward returns; "next-forward", once the next forward
    # has launched its first block (a forward hook there, while the GPU runs it), or before the main
    # thread blocks for a host buffer, or at the end. The second keeps them out of the copy engine's
    # queue while the next forward's prefix runs: GPT-2's reads a flag back to the host there (a sync,
    # every forward), and a read-back queued behind a batch's copy leaves the GPU idle for the copy.
    # An experiment: bench_extract --copies-at measures the two side by side; the first is the one
    # measured on the H200 so far.
    copies_at = "return"
    # How the model's packed-sequence check runs in extract's forwards of packed inputs (no attention
    # mask): "model", as transformers does it, with a host sync; "async", on the device without one
    # (_packed_check_on_device). An experiment: bench_extract --mask-sync measures both side by side.
    mask_sync = "model"

    def __init__(self, base, layout, cfg, source, opts: ExtractOptions, specs, pos, n_pos, seqs_per_shard,
                 n_buffers, manifest: _Manifest, rank, world, progress, device):
        self.base, self.layout, self.cfg, self.source, self.opts = base, layout, cfg, source, opts
        self.specs, self.pos, self.n_pos, self.seqs_per_shard = specs, pos, n_pos, seqs_per_shard
        self.n_buffers, self.manifest, self.rank, self.world = n_buffers, manifest, rank, world
        self.n_writers = n_buffers - 1  # each writes from one buffer while one more fills
        self.n_publishers = opts.publishers or default_publishers(self.n_writers)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.progress = progress
        self.waits = _Waits()
        self.written = self.n_tokens = self.n_rows = self.bytes = 0
        self.skipped = 0
        self.n_blocks = 0
        self.seconds = 0.0
        self.errors: list[BaseException] = []
        self._stats_lock = threading.Lock()
        self._t0 = time.perf_counter()  # reset when the first forward starts
        self.vocab = _vocab_size(base)

    def wanted(self, index: int) -> bool:
        return index % self.world == self.rank and index not in self.manifest.records

    def finished_here(self, index: int) -> bool:
        """A shard of this rank that an earlier run finished: its input is checked against its record."""
        return index % self.world == self.rank and index in self.manifest.records

    def _check_finished(self, skipped: _inputs.Skipped) -> None:
        record = self.manifest.records[skipped.index]
        want = record.get("input_sha256")  # absent from manifests written before it was recorded
        if want is not None and want != skipped.digest:
            raise _store.ManifestMismatchError(
                f"data: the token sequences of shard {skipped.index} differ from those its finished shard "
                f"{record['file']!r} was made from (input sha256 {want[:12]}…, now {skipped.digest[:12]}…): "
                f"the input changed since {self.manifest.out!r} was started, or how it is read did (another "
                "tokenizer, or a residtap from before 2026-11-30, which also ended a text line at a lone "
                "carriage return). Nothing of the finished shards was overwritten. Restore the data, or use "
                "a new --out directory.")

    def check_finished_inputs(self, changed: list[str]) -> None:
        """Where the input's contents changed since the extraction started (``changed`` says how; a bad
        line fixed, say), every shard of this process that an earlier run finished is checked against the
        input as it is now, all of them before anything is computed: a changed one is refused with nothing
        new written beside it (go() checks them again as it passes them, which costs only a digest)."""
        mine = sorted(i for i in self.manifest.records if self.finished_here(i))
        if self.rank == 0:  # (every process checks the shards it owns)
            n = len(self.manifest.records)
            say(f"residtap extract: warning: the input has changed since {self.manifest.out!r} was started "
                f"({'; '.join(changed)}); checking the sequences of its {n} finished shard"
                f"{'s' if n != 1 else ''} against it before computing anything")
        if not mine:
            return
        seen = -1
        blocks = self.source.blocks(self.seqs_per_shard, lambda index: False, self.finished_here)
        with contextlib.closing(blocks):
            for item in blocks:
                _SIGNALS.check()
                seen = item.index
                if item.digest is not None:
                    self._check_finished(item)
                if seen >= mine[-1]:
                    return
        record = self.manifest.records[mine[-1]]
        raise _store.ManifestMismatchError(
            f"data: the input now ends {'before its first shard' if seen < 0 else f'after shard {seen}'}, "
            f"but shard {mine[-1]} ({record['file']!r}) was finished from it: the input changed since "
            f"{self.manifest.out!r} was started. Nothing of the finished shards was overwritten. Restore the "
            "data, or use a new --out directory.")

    # -------------------------------------------------------------------- writer side
    def _writer(self, jobs: queue.Queue, pool: queue.Queue, published: queue.Queue) -> None:
        """Writes each shard handed over (after its copies to the host) under a temporary name and
        returns the host buffer at once; then hands the file to a publisher, which hashes it while this
        thread fsyncs it (on a disk-bound run the last shard's hash then no longer follows its fsync)
        and renames it once ``synced`` says the fsync is done."""
        if self.cuda:  # else this thread's first CUDA call (an event wait) would open a context on
            torch.cuda.set_device(self.device)  # GPU 0, which another rank of torchrun is using
        while (host := jobs.get()) is not None:
            pending = None
            try:
                if self.errors:
                    continue  # stop writing once anything failed; the buffer goes back below
                if host.events:
                    with self.waits.on("d2h"):
                        for event in host.events:
                            event.synchronize()
                tensors, n_rows = self._shard_tensors(host)
                b = host.block
                meta = {"format": _store.FORMAT, "shard": b.index, "seq_start": b.seq_start,
                        "layer_ids": ",".join(map(str, self.cfg.layer_ids))}
                # the record's fields after index, file, bytes and sha256 (publish_shard's)
                fields = {"seq_start": b.seq_start, "seq_stop": b.seq_start + b.n_seqs, "n_seqs": b.n_seqs,
                          "n_tokens": b.n_tokens, "n_rows": n_rows, "input_sha256": b.digest(),
                          "source_first": b.source[0].tolist(), "source_last": b.source[-1].tolist()}
                with self.waits.on("write"):
                    pending = _store.save_shard_file(self.manifest.out, b.index, tensors, meta)
            except BaseException as e:  # noqa: BLE001 — handed to the main thread, which raises it
                self._write_failed(host.block.index, e)
            finally:
                host.block, host.events = None, []
                pool.put(host)  # free for the next forward's copies before the fsync and the publisher
            if pending is None:
                continue
            synced = concurrent.futures.Future()  # True once fsynced; False: failed, said and removed
            published.put((pending, fields, synced))
            ok = False
            try:
                with self.waits.on("write"):
                    _store.sync_shard_file(pending)
                ok = True
            except BaseException as e:  # noqa: BLE001 — handed to the main thread, which raises it
                self._write_failed(pending.index, e)
            finally:
                synced.set_result(ok)

    def _write_failed(self, index: int, e: BaseException) -> None:
        # (writing into a directory rank 0 took back and removed: say that, not "no such file")
        refused = self.manifest.taken_back(index) if isinstance(e, _store.StoreError) else None
        self.errors.append(e if refused is None else refused)

    def _publisher(self, published: queue.Queue, bar) -> None:
        """Hashes each written shard while its writer fsyncs it, then renames it to its final name and
        records it in the manifest: beside the writers, so that hashing (slower than writing per byte)
        holds no host buffer."""
        while (item := published.get()) is not None:
            pending, fields, synced = item
            try:  # even after a failure elsewhere: a shard written whole is good, a resume keeps it
                with self.waits.on("hash"):
                    try:  # before the record lock (recording): one rank's first record waits on no
                        hashed, failed = _store.hash_shard(pending), None  # other's hashing
                    except BaseException as e:  # noqa: BLE001 — raised below, once the fsync is over
                        hashed, failed = None, e
                if not synced.result():  # the fsync failed: its writer said so and removed the file
                    continue
                if failed is not None:
                    _store.discard_shard(pending)
                    raise failed
                with self.waits.on("hash"), self.manifest.recording(pending):
                    rec = _store.publish_shard(pending, hashed)  # removes its temporaries whatever happens
                    self.manifest.add({"index": pending.index, **rec, **fields})
                with self._stats_lock:
                    self.written += 1
                    self.n_rows += fields["n_rows"]
                    self.bytes += rec["bytes"]
                if bar is not None:
                    bar.set_postfix_str(self._postfix(), refresh=False)
            except BaseException as e:  # noqa: BLE001 — handed to the main thread, which raises it
                self.errors.append(e)

    def _shard_tensors(self, host: _HostShard) -> tuple[dict, int]:
        b = host.block
        n, p = b.n_seqs, self.n_pos
        seq_index = np.repeat(np.arange(b.seq_start, b.seq_start + n, dtype=np.int64), p)
        keep = None
        if self.pos is None:  # "last": each sequence's last real token (right padding)
            position = (np.full(n, b.input_ids.shape[1] - 1) if b.attention_mask is None
                        else b.attention_mask.sum(1) - 1).astype(np.int32)
        else:
            position = np.tile(self.pos.astype(np.int32), n)
            if b.attention_mask is not None:  # padding rows are not stored
                keep_np = b.attention_mask[:, self.pos].reshape(-1)
                if not keep_np.all():
                    keep = torch.from_numpy(keep_np)
                    seq_index, position = seq_index[keep_np], position[keep_np]
        tensors = {}
        for name, per_layer in host.out.items():
            for lid, t in zip(self.cfg.layer_ids, per_layer):
                t = t[:host.rows]
                tensors[_store.tensor_name(name, lid)] = t if keep is None else t[keep]
        tensors["seq_index"] = torch.from_numpy(seq_index)
        tensors["position"] = torch.from_numpy(position)
        tensors["input_ids"] = torch.from_numpy(b.input_ids.astype(np.int32))
        tensors["source"] = torch.from_numpy(b.source)
        if b.attention_mask is not None:
            tensors["attention_mask"] = torch.from_numpy(b.attention_mask.astype(np.uint8))
        return tensors, len(seq_index)

    def _postfix(self) -> str:
        label = "gpu" if self.cuda else "cpu"
        el = time.perf_counter() - self._t0
        return (f"{_fmt_waits(self.waits.t, el, label, self.n_writers, self.n_publishers)} "
                f"| shards {self.written}")

    # -------------------------------------------------------------------- main side
    def go(self) -> None:
        if self.copies_at not in ("return", "next-forward"):
            raise ValueError(f"_Run.copies_at: expected 'return' or 'next-forward', got {self.copies_at!r}")
        if self.mask_sync not in ("model", "async"):
            raise ValueError(f"_Run.mask_sync: expected 'model' or 'async', got {self.mask_sync!r}")
        opts = self.opts
        rows = self.seqs_per_shard * self.n_pos
        L = len(self.cfg.layer_ids)
        pool: queue.Queue = queue.Queue()
        for _ in range(self.n_buffers):
            pool.put(_HostShard(self.specs, L, rows, pin=self.cuda))
        jobs: queue.Queue = queue.Queue()
        total = None
        if self.source.n_sequences is not None:
            n = self.source.n_sequences
            total = self.source.seq_len * sum(min(self.seqs_per_shard, n - i * self.seqs_per_shard)
                                              for i in range(math.ceil(n / self.seqs_per_shard))
                                              if self.wanted(i))
        # Before the threads and the progress bar, which only the try below ends: a capture that cannot
        # be set up (its parity probe fails, say) leaves none of them behind.
        caps = [Capture(self.base, list(self.cfg.layer_ids), self.cfg.positions, self.cfg.dtype,
                        self.cfg.outputs, backend=self.cfg.backend, overlap=self.cfg.overlap,
                        blocks=list(self.layout.blocks), final_norm=self.layout.final_norm)
                for _ in range(2)]
        base = self.base
        queues = _queues_for(self.device)  # asynchronous copies (CUDA); None on the CPU
        show = self.progress if self.progress is not None else (sys.stderr.isatty() and self.rank == 0)
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="tok", unit_scale=True, dynamic_ncols=True,
                       desc=f"extract{f' rank {self.rank}' if self.world > 1 else ''}")
        # Written shards waiting for a publisher: bounded, so that writers (and then the forwards)
        # wait when hashing falls behind rather than leave ever more shards unrecorded.
        published: queue.Queue = queue.Queue(maxsize=2 * self.n_writers)
        threads = [threading.Thread(target=self._writer, args=(jobs, pool, published), daemon=True,
                                    name=f"residtap-writer-{k}") for k in range(self.n_writers)]
        publishers = [threading.Thread(target=self._publisher, args=(published, bar), daemon=True,
                                       name=f"residtap-publisher-{k}") for k in range(self.n_publishers)]
        for t in threads + publishers:
            t.start()
        # Per capture the (device, event) pairs of its last copies, which that device's next forward
        # into it waits for.
        slot_free: list[list] = [[], []]
        inflight: collections.deque = collections.deque()  # per forward: its events, one per device
        pending = None  # (capture slot, copies): the last forward's CUDA copies, not yet queued
        full = None  # the host buffer of a complete shard, handed over once ``pending`` is queued
        defer = queues is not None and self.copies_at == "next-forward"

        def hand_over(host: _HostShard) -> None:
            if queues is not None:
                host.events = queues.copies_done()
            jobs.put(host)

        def queue_pending() -> None:
            """Queue the last forward's copies, then hand its shard over if complete; if not yet done."""
            nonlocal pending, full
            if pending is None:
                return
            (slot, copies), pending = pending, None
            slot_free[slot] = [(dev, queues.copy(dev, after, pairs)) for dev, after, pairs in copies]
            if full is not None:
                host, full = full, None
                hand_over(host)

        self._t0 = time.perf_counter()
        k = 0
        # The next shards' sequences are read (and tokenized) on a thread of their own meanwhile.
        reader = _inputs.ReadAhead(self.source.blocks(self.seqs_per_shard, self.wanted, self.finished_here))
        # "next-forward": inside the forward, so its time counts as the model's in waits
        first_block = (self._first_block().register_forward_hook(lambda *_: queue_pending())
                       if defer else None)
        try:
            with reader, torch.inference_mode(), (torch.cuda.device(self.device) if self.cuda
                                                  else contextlib.nullcontext()):
                items = iter(reader)
                while True:
                    with self.waits.on("input"):  # the reader (reading, tokenizing) is behind
                        item = next(items, None)
                    if item is None or self.errors:
                        break
                    self._stop_if_asked()
                    if isinstance(item, _inputs.Skipped):
                        self.n_blocks = item.index + 1
                        self.skipped += self.finished_here(item.index)
                        if item.digest is not None:
                            self._check_finished(item)
                        continue
                    block = item
                    self.n_blocks = block.index + 1
                    if pool.empty():  # about to wait for a writer: let them have the last shard first
                        queue_pending()
                    with self.waits.on("disk"):  # every host buffer is still being written
                        host = pool.get()
                    host.block, host.rows = block, 0
                    for b0 in range(0, block.n_seqs, opts.batch_size):
                        self._stop_if_asked()
                        batch = slice(b0, b0 + opts.batch_size)
                        ids = block.input_ids[batch]
                        mask = None if block.attention_mask is None else block.attention_mask[batch]
                        self._check_ids(ids, block.seq_start + b0)
                        cap = caps[k % 2]
                        if queues is not None:
                            for dev, event in slot_free[k % 2]:  # its last copies must finish first
                                queues.compute_waits(dev, event)
                            if len(inflight) >= 2:  # keep the host at most two forwards ahead
                                with self.waits.on("model"):
                                    for event in inflight.popleft():
                                        event.synchronize()
                        x = self._to_device(ids)
                        kw = ({} if mask is None else
                              {"attention_mask": self._to_device(mask.astype(np.int64))})
                        # On CUDA too: a model may synchronize with the GPU inside its forward (GPT-2's
                        # causal-mask code in transformers 5 does, every forward), the throttle above
                        # then never waits, and the wait for the GPU is in here.
                        # (with copies_at "next-forward", the last forward's copies are queued in here)
                        with self.waits.on("model"), cap, _mask_check_on_device(
                                self.mask_sync == "async" and mask is None):
                            base(input_ids=x, use_cache=False, **kw)
                        queue_pending()  # (only if the forward never ran its first block's hook)
                        copies = self._copies_out(cap, host, queues)
                        if copies:
                            inflight.append([after for _, after, _ in copies])
                            pending = (k % 2, copies)
                            if not defer:
                                queue_pending()
                        host.rows += ids.shape[0] * self.n_pos
                        k += 1
                        if bar is not None:
                            bar.update(int(ids.size if mask is None else mask.sum()))
                    self.n_tokens += block.n_tokens
                    self._stop_if_asked()  # not handed to the writers: a shard with its last batch cut short
                    if pending is not None:  # after its last copies, whenever they are queued
                        full = host
                    else:
                        hand_over(host)
                    if bar is not None:
                        bar.set_postfix_str(self._postfix(), refresh=False)
                queue_pending()
        finally:
            if first_block is not None:
                first_block.remove()
            if full is not None:  # stopped by an error: a complete shard
                with contextlib.suppress(Exception):  # is still written (the error is the one to raise)
                    queue_pending()
            for _ in threads:
                jobs.put(None)  # writers finish the shards already handed over, then stop
            for t in threads:
                t.join()
            for _ in publishers:
                published.put(None)  # then publishers finish what the writers wrote
            for t in publishers:
                t.join()
            self.seconds = time.perf_counter() - self._t0
            if bar is not None:
                bar.set_postfix_str(self._postfix())
                bar.close()
        if self.errors:
            raise self.errors[0]
        if self.n_blocks == 0:
            path = getattr(self.source, "path", None)  # None: an array given to the Python API
            raise ValueError(f"data: no complete sequence of {self.source.seq_len} tokens in "
                             f"{'the input array' if path is None else repr(path)}")

    def _first_block(self) -> nn.Module:
        """Where copies_at "next-forward" queues the last forward's copies (a forward hook)."""
        return self.layout.blocks[0]

    def _stop_if_asked(self) -> None:
        """A checkpoint of go() for the command line's SIGTERM and Ctrl-C (_Signals); not once a writer or
        publisher has failed: the loop stops at the next shard for that, and its error (a full disk, say)
        is the one to report."""
        if not self.errors:
            _SIGNALS.check()

    def _check_ids(self, ids: np.ndarray, first_seq: int) -> None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (self.vocab is not None and hi >= self.vocab):
            bad = lo if lo < 0 else hi
            row = int(np.argwhere((ids == bad).any(1))[0, 0])
            raise ValueError(f"data: token id {bad} in sequence {first_seq + row} is outside the model's "
                             f"vocabulary [0, {self.vocab})")

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        # a batch of ids is small: a read-only one (a memory-mapped .npy) is copied, which torch
        # otherwise warns about
        t = torch.from_numpy(np.require(a, requirements=["C", "W"]))
        if self.cuda:  # pinned, so the upload is asynchronous
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _copies_out(self, cap: Capture, host: _HostShard, queues: _CudaQueues | None) -> list:
        """Copy capture ``cap``'s tensors into ``host`` rows [host.rows, ...), each layer from the
        device it was captured on. On the CPU (and any device ``queues`` does not handle) the copies
        are made here; on CUDA they are returned as (device, an event after the forward there,
        [(src, dst), ...]) for _CudaQueues.copy to queue on that device's copy stream."""
        srcs = {}  # stored name -> per layer [B, P, ...]: views into cap's buffers
        for o in ("resid", "delta", "normed"):
            if o in self.specs:
                srcs[o] = cap.per_layer(o)  # raises if the forward did not fill it
        if "stats" in self.cfg.outputs:
            for s, per_layer in zip(STAT_NAMES, zip(*cap.per_layer("stats"))):
                srcs[s] = per_layer  # each [B, P]
        for name, per_layer in srcs.items():
            want, src = host.out[name][0], per_layer[0]  # every layer's buffer has one dtype and shape
            if src.dtype != want.dtype or src.shape[2:] != want.shape[1:]:  # copy_ would convert quietly
                raise RuntimeError(f"residtap extract: captured {name} is {src.dtype} {tuple(src.shape)}, "
                                   f"expected {want.dtype} [..., {', '.join(map(str, want.shape[1:]))}] (the "
                                   "model's hidden states differ from its parameters' dtype or hidden_size)")
        r0 = host.rows
        by_device: dict[torch.device, list] = {}  # in name, then layer order
        for name, per_layer in srcs.items():
            for src, dst in zip(per_layer, host.out[name]):
                s = src.reshape(-1, *src.shape[2:])  # contiguous: one DMA per layer
                by_device.setdefault(src.device, []).append((s, dst[r0:r0 + s.shape[0]]))
        copies = []
        for device, pairs in by_device.items():
            if queues is None or not queues.handles(device):  # the forward is done: copy now
                for s, dst in pairs:
                    dst.copy_(s)
                continue
            copies.append((device, queues.compute_done(device), pairs))
        return copies


def _vocab_size(model) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except Exception:  # a model without the HF accessor: the embedding raises its own error
        return None


# ------------------------------------------------------------------------------------------ CLI
def _parse_ints(text: str, name: str, also: str = ""):
    if text in (None, "all"):
        return None
    try:
        if ":" in text:
            parts = [int(p) if p else None for p in text.split(":")]
            if len(parts) > 3 or parts[2:] == [0]:
                raise ValueError
            return slice(*parts)
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name}: expected 'all', {also}an int, a comma list '0,6,12' or a range "
                         f"'a:b[:step]' (step not 0), got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def _parse_layers(text: str):
    sel = _parse_ints(text, "--layers")
    if isinstance(sel, slice):  # a:b → those residual indices (a, b explicit: the model is not loaded yet)
        if sel.start is None or sel.stop is None or sel.start < 0 or sel.stop < 0:
            raise ValueError(f"--layers: a range needs both ends, non-negative, e.g. 0:13; got {text!r}")
        if sel.step is not None and sel.step < 1:
            raise ValueError(f"--layers: a range's step must be >= 1, got {text!r}")
        return list(range(sel.start, sel.stop, sel.step or 1))
    return sel


_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' names


def _parse_device_map(text: str | None):
    """--device-map: a strategy name for transformers, or a JSON file mapping modules to devices.

    A file that cannot be read is a bad argument like any other: a ValueError, which the command line
    reports as one "error:" line with exit status 2 (a SystemExit here would exit 1, the status of a
    failed run)."""
    if text is None or text in _DEVICE_MAP_STRATEGIES:
        return text
    if not text.endswith(".json"):
        raise ValueError(f"--device-map: expected {', '.join(_DEVICE_MAP_STRATEGIES)} or a JSON file of "
                         f"{{module: device}} (a name ending in .json), got {text!r}; for one device, "
                         "--device")
    try:
        with open(text) as f:
            mapping = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--device-map: expected auto, balanced, sequential or a JSON file of "
                         f"{{module: device}}, could not read {text!r}: {e}") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"--device-map: {text!r} must hold a JSON object {{module: device}}, got "
                         f"{type(mapping).__name__}")
    return mapping


def _input_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """Where the model's inputs belong: its embeddings' execution device (accelerate), else the
    first parameter's that is not on the meta device, else ``fallback``."""
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    device = module_device(emb) if emb is not None else None
    return device or module_device(model) or fallback


# extract()'s errors name its parameters ("batch_size: ..."); on the command line they name the flag
# instead, which is the parameter's name with dashes ("--batch-size: ..."). A random: model's size and
# key=value overrides are part of --model.
_FLAG_OF = {"size": "--model", "overrides": "--model"}


def _on_the_command_line(message: str, args) -> str:
    """``message`` (an error of extract() about its arguments) as the command line says it."""
    names, sep, rest = message.partition(": ")
    dests = set(vars(args)) - {"command", "func"}
    flags = [_FLAG_OF.get(n) or (f"--{n.replace('_', '-')}" if n in dests else None)
             for n in names.split(", ")]
    if not sep or None in flags:  # not about an argument ("world_size > 1 needs torchrun ...")
        return message
    if names == "layers" and ":" in args.layers and ", got " in rest:
        # a range: what the user typed, not the first of its indices that is out of range
        rest = rest[:rest.rindex(", got ")] + f", got {args.layers}"
    return ", ".join(flags) + ": " + rest


def _interrupted(out: str, how: str = "interrupted") -> str:
    """The line that replaces a Ctrl-C's traceback (or says that SIGTERM ended the run: ``how``), once
    extract() has cleaned up: what the directory keeps and that the same command resumes."""
    rank, world, _ = _dist_env(None, None)
    who = f"rank {rank}: " if world > 1 else ""
    n = _n_kept(out)
    kept = (f"{out!r} keeps its {n} complete shard{'s' if n != 1 else ''} and nothing partial" if n else
            "no shard was complete yet, so nothing is kept")
    return f"residtap extract: {who}{how}; {kept}. Run the same command again to resume."


def _end_by_signal(signum: int, flush: bool = True) -> int:
    """End this process by ``signum``, as the signal's default action does, so that a shell (torchrun, a
    job scheduler) running it sees a death by that signal rather than an exit status."""
    if flush:
        sys.stdout.flush()
        sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum  # where a signal sent to itself does not end the process at once


def _end_by_sigint() -> int:
    """End this process by SIGINT, as an uncaught KeyboardInterrupt does (a shell then stops its script)."""
    return _end_by_signal(signal.SIGINT)


def _end_by_sigterm() -> int:
    return _end_by_signal(signal.SIGTERM)


def _end_at_once() -> None:
    """SIGTERM's default action, from the command line's handler outside extract's window. Nothing is
    flushed, as the default action flushes nothing: the handler runs in the main thread wherever it
    was, possibly inside a write to stderr that blocks (a pipe nobody reads), and a flush of that
    stream from here fails ("reentrant call", a RuntimeError that would replace the death by SIGTERM)."""
    _end_by_signal(signal.SIGTERM, flush=False)


class _Terminated(BaseException):
    """SIGTERM, taken at one of extract's checkpoints (_Signals.check). A BaseException, as
    KeyboardInterrupt is, so that it takes Ctrl-C's way out: no ``except Exception`` catches it, go()'s
    finally lets the writers and publishers finish the shards handed to them, and a first run with no
    shard recorded is taken back."""


class _Signals:
    """The command line's SIGTERM (kill, a job scheduler's time limit, torchrun ending the other workers
    when one fails) and Ctrl-C (SIGINT), while extract() holds a directory (``deferring``: from making it
    to the end of go()), where an interruption must let the writers and publishers finish what they hold.

    There the handler only notes the signal, and extract raises it (_Terminated, or KeyboardInterrupt)
    at its next checkpoint (check(): each batch, each shard handed to the writers, each shard a resume
    verifies), in the main thread, where it holds no lock and waits on nothing. So a signal is taken
    within a batch (a forward, its copies, or a wait for a free host buffer). Once one is noted, further
    SIGTERMs and SIGINTs are ignored until the line is said: a second one raised in go()'s joins would
    end the process with a shard half published, and under torchrun every worker gets a terminal's
    Ctrl-C twice (from the terminal, then from torchrun). SIGQUIT, and torchrun's SIGKILL 30 s after its
    SIGTERM, stay the backstops. Outside the window (loading the model, tokenizing, the final manifest)
    nothing needs cleaning up: SIGTERM ends the process at once, as its default action does, and SIGINT
    raises KeyboardInterrupt at once, as Python's own handler does.

    SIGINT is handled only where Python's own handler has it: an ignored one (a background job) stays
    ignored, and a caller's own handler stays in place. Only the command line installs the handler
    (install(), from the main thread, as signal.signal requires): the Python API leaves both signals to
    its caller, and there ``asked`` is never set."""

    def __init__(self):
        self.deferring = False
        self.asked = 0  # the signal noted (SIGTERM or SIGINT), 0 where none

    def _handler(self, signum, frame):
        if self.asked:
            return
        if not self.deferring:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # Python's own handler's action
            _end_at_once()
        self.asked = signum

    @contextlib.contextmanager
    def install(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.asked = 0
        previous = signal.signal(signal.SIGTERM, self._handler)
        if previous is None:  # a handler set from C, which Python cannot put back: the default then
            previous = signal.SIG_DFL
        # Ctrl-C only where Python's own handler has it: not where it is ignored (a background job, which
        # a terminal's Ctrl-C is not for) nor where the caller has a handler of its own
        previous_int = signal.getsignal(signal.SIGINT)
        ctrl_c = previous_int is signal.default_int_handler
        if ctrl_c:
            signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        except (_Terminated, KeyboardInterrupt):
            # The caller says so in one line, then ends by that signal: further SIGTERMs and SIGINTs stay
            # ignored until then (restoring the previous actions here would let one end the process, or
            # raise a KeyboardInterrupt through the caller, before the line).
            previous = previous_int = signal.SIG_IGN
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            if ctrl_c:
                signal.signal(signal.SIGINT, previous_int)
            self.asked = 0  # (taken by now, or too late to matter): not for a later call in this process

    @contextlib.contextmanager
    def default_actions(self):
        """SIGTERM and SIGINT at their default actions, which end the process even inside a C++ call
        that a Python handler would wait for, where the command line's handler has them (outside
        extract's window only, where nothing needs cleaning up; the Python API's, a caller's, an ignored
        SIGINT, stay as they are)."""
        mine = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) == self._handler]
        for s in mine:
            signal.signal(s, signal.SIG_DFL)
        try:
            yield
        finally:
            for s in mine:
                signal.signal(s, self._handler)

    def check(self) -> None:
        """Raise _Terminated where a SIGTERM has come in, KeyboardInterrupt where a SIGINT has (the command
        line's handler noted it)."""
        if self.asked == signal.SIGINT:
            raise KeyboardInterrupt
        if self.asked:
            raise _Terminated("SIGTERM")

    @contextlib.contextmanager
    def deferred(self):
        """extract's window where SIGTERM and Ctrl-C wait for a checkpoint (the last one where it ends)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def undefer(self) -> None:
        """End the window, taking a signal it noted: from here a signal acts at once. In that order: one
        that comes between the two is then either noted before the check, which takes it, or comes after
        the window and acts at once; the other way round, one noted just after the check would be taken
        nowhere (and would make the handler ignore every later one)."""
        self.deferring = False
        self.check()


_SIGNALS = _Signals()


def cmd_extract(args) -> int:
    from .cli import layout_kwargs

    layers = _parse_layers(args.layers)
    try:
        positions = ("last" if args.positions == "last"
                     else _parse_ints(args.positions, "--positions", also="'last', "))
        with _SIGNALS.install():
            res = extract(args.model, args.data, args.out, layers=layers, positions=positions,
                          outputs=tuple(args.outputs.split(",")), dtype=args.dtype,
                          batch_size=args.batch_size, seq_len=args.seq_len, max_tokens=args.max_tokens,
                          packing=args.packing, tokenizer=args.tokenizer, text_field=args.text_field,
                          split=args.split, shard_size=args.shard_size, host_memory=args.host_memory,
                          writers=args.writers, publishers=args.publishers, device=args.device,
                          model_dtype=args.model_dtype, seed=args.seed,
                          device_map=_parse_device_map(args.device_map),
                          backend=args.backend, overlap=args.overlap,
                          progress=False if args.no_progress else None,
                          verify_existing=not args.no_verify_existing, **layout_kwargs(args))
    except _store.StoreError as e:
        say(f"residtap extract: error: {_on_the_command_line(str(e), args)}")
        return 1
    except ValueError as e:
        raise ValueError(_on_the_command_line(str(e), args)) from e
    except KeyboardInterrupt:
        # extract() has cleaned up on the way out (its threads finished what they had, nothing partial is
        # listed, temporaries removed, a run with no shard taken back): one line, not a traceback through
        # transformers. Taken at a checkpoint where the Ctrl-C came while extract held the directory; a
        # second Ctrl-C during that cleanup, or now, is ignored (_Signals.install), so the line comes once.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        say(_interrupted(args.out))
        return _end_by_sigint()
    except _Terminated:
        # SIGTERM (torchrun ending this worker because another failed, a scheduler, kill), taken at a
        # checkpoint: the same cleanup as Ctrl-C's has run; the same line (further SIGTERMs are ignored
        # now: _Signals.install), then the death by SIGTERM its sender expects.
        say(_interrupted(args.out, "terminated (SIGTERM)"))
        return _end_by_sigterm()
    if int(os.environ.get("RANK", 0)) == 0:
        t = res.manifest.get("totals", {})
        run = res.all_processes  # (this process's own counts where it ran alone)
        world = int(os.environ.get("WORLD_SIZE", 1))
        rate = run["n_tokens"] / run["seconds"] if run["seconds"] > 0 else 0.0
        print(f"residtap extract: {res.out}: {'complete' if res.complete else 'incomplete'}, "
              f"{res.n_shards} shards, {t.get('n_rows', '?')} rows ({t.get('bytes', 0) / 1e9:.3f} GB); this "
              f"run wrote {run['shards_written']} shards ({run['shards_skipped']} already done) in "
              f"{run['seconds']:.1f} s, {rate:,.0f} tok/s{f' over {world} processes' if world > 1 else ''}")
    return 0


def register_cli(sub) -> None:
    from .cli import _positive_int
    from .selection import DTYPES

    e = sub.add_parser("extract", help="stream captured activations to disk (shards + manifest), resumable",
                       description="Capture the residual stream of a model over a dataset and write it to "
                                   "safetensors shards with a JSON manifest. Re-running the same command "
                                   "resumes after the last complete shard. Data parallel: torchrun "
                                   "--nproc-per-node N -m residtap extract ...")
    e.add_argument("--model", required=True,
                   help="local HF model directory or cached name (offline), or random:gpt2-small"
                        "[,n_layer=2,n_embd=64,...] (seeded random weights)")
    e.add_argument("--data", required=True, help=".npy token ids, .txt (a document per line), .jsonl, or a "
                                                 "dataset directory saved with datasets' save_to_disk")
    e.add_argument("--out", required=True, help="output directory (created; resumed if it holds this run)")
    e.add_argument("--layers", default="all", help="residual indices: all, 12, 0,6,12 or a:b (default all)")
    e.add_argument("--positions", default="all",
                   help="positions per sequence: all (default), last (last real token), -1, 0,5,9 or "
                        "a:b[:step]")
    e.add_argument("--outputs", default="resid", help=f"comma list of {','.join(OUTPUTS)} (default resid)")
    # names only: None (the model's dtype, in the Python API) is the default here, not a value to type
    e.add_argument("--dtype", default=None, choices=sorted(DTYPES), metavar="DTYPE",
                   help="capture dtype: float32, bfloat16 or float16 (default: the model's)")
    e.add_argument("--model-dtype", default=None, choices=sorted(DTYPES), metavar="DTYPE",
                   help="dtype to load the model in (default: checkpoint's)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward (default 8)")
    e.add_argument("--seq-len", type=_positive_int, default=None,
                   help="tokens per sequence (default: a 2-D .npy's width, else min(1024, model max))")
    e.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="stop after ceil(N / seq_len) sequences")
    e.add_argument("--packing", default="pack", choices=_inputs.PACKINGS,
                   help="pack (default): concatenate documents and cut; pad: one document per sequence, padded")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    e.add_argument("--text-field", default=None,
                   help="JSONL / dataset text field (default text; a dataset's input_ids column, if it has "
                        "one, is read as it is unless this is given)")
    e.add_argument("--split", default=None, help="dataset split (default train)")
    e.add_argument("--shard-size", default="1GiB", help="activation bytes per shard, whole batches (1GiB)")
    e.add_argument("--host-memory", default="8GiB", help="host buffer budget (8GiB)")
    e.add_argument("--writers", type=_positive_int, default=2,
                   help="writer threads (2), each with one shard buffer")
    e.add_argument("--publishers", type=_positive_int, default=None,
                   help="threads hashing (sha256) and renaming written shards (default: twice the writers "
                        "where the cores allow, at least as many)")
    e.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) or cpu")
    e.add_argument("--device-map", default=None,
                   help="load the model spread over devices (accelerate): auto, balanced, sequential, "
                        "or a JSON file {module: device}; replaces --device")
    e.add_argument("--seed", type=int, default=0, help="seed of random: models")
    e.add_argument("--backend", default=None, choices=["auto", "compiled", "reference"],
                   help="default: auto (the compiled op where it runs, else the reference; RESIDTAP_BACKEND)")
    e.add_argument("--overlap", action="store_true",
                   help="capture each layer on a side stream beside the next blocks (CUDA; see README)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown on a terminal)")
    e.add_argument("--no-verify-existing", action="store_true",
                   help="on resume, check existing shards' sizes only, not their sha256")
    from .cli import add_layout_args

    add_layout_args(e)
    e.set_defaults(func=cmd_extract)


def _register() -> None:
    from . import cli

    if register_cli not in cli._EXTRA_COMMANDS:
        cli._EXTRA_COMMANDS.append(register_cli)


_register()
