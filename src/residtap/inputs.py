"""Where the token sequences of an extraction come from: .npy token ids, text or JSONL files through a
tokenizer, or a local HF dataset (``datasets.load_from_disk``).

A source yields fixed-length sequences in one deterministic order, grouped into blocks (one block per
shard). Every sequence carries where it came from: ``(document, token offset in that document)``.

- ``packing="pack"``: documents are concatenated (the tokenizer's EOS after each document that does not
  already end with it) and cut into ``seq_len`` tokens; the incomplete tail is dropped.
- ``packing="pad"``: each document is cut into pieces of at most ``seq_len`` tokens; a short piece is
  padded on the right and its ``attention_mask`` marks the real tokens.

A 1-D ``.npy`` is one token stream (pack only); a 2-D ``.npy`` ``[n, seq_len]`` holds the sequences as
they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import queue
import threading
import warnings
from typing import Iterator

import numpy as np

from .selection import positive_int

PACKINGS = ("pack", "pad")
# The keys of Source.describe() that fingerprint what the input holds (its size, a hash of its bytes,
# its shape, a dataset's fingerprint), as opposed to which input it is and how it is read. A resumed
# extraction lets these change (a bad line fixed, say) where each finished shard recorded the digest of
# its own sequences: those are then checked against the input as it is now, before anything is computed.
CONTENT_KEYS = frozenset({"bytes", "sha256_head_tail", "sha256", "shape", "dtype", "rows",
                          "dataset_fingerprint"})
TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
_CHUNK_DOCS = 1000  # documents tokenized, or dataset rows read, at a time


@dataclasses.dataclass
class Block:
    """The sequences of one shard. ``input_ids`` ``[n, seq_len]`` int64; ``attention_mask`` ``[n, seq_len]``
    bool or None (packed); ``source`` ``[n, 2]`` int64: (document, token offset) of each first token."""

    index: int
    seq_start: int
    input_ids: np.ndarray
    attention_mask: np.ndarray | None
    source: np.ndarray

    @property
    def n_seqs(self) -> int:
        return self.input_ids.shape[0]

    def digest(self) -> str:
        """sha256 of what this block feeds the model and records: its token ids, mask and sources. A
        resumed extraction compares it with the digest each finished shard recorded, so data that
        changed under a finished shard is an error, not a silent mix of two inputs."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.input_ids, dtype=np.int64).tobytes())
        if self.attention_mask is not None:
            h.update(b"mask")
            h.update(np.ascontiguousarray(self.attention_mask, dtype=np.uint8).tobytes())
        h.update(np.ascontiguousarray(self.source, dtype=np.int64).tobytes())
        return h.hexdigest()

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) input tokens."""
        if self.attention_mask is None:
            return int(self.input_ids.size)
        return int(self.attention_mask.sum())


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A block this process does not compute; ``digest`` is its Block.digest() where it was asked for."""

    index: int
    digest: str | None = None


class ReadAhead:
    """Iterate ``items`` (a source's blocks) on a thread of its own, at most ``depth`` items ahead of the
    caller, so that reading and tokenizing the next shard's documents overlaps the forwards of this one
    rather than leave the GPU idle between them (fast tokenizers release the GIL while they encode).
    The items, and an error raised while making one, come in order, as from ``items`` itself.
    ``close()`` (also on leaving ``with``) stops the thread: it finishes the item it is making, makes
    no more, and closes ``items`` there."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 2, name: str = "residtap-reader"):
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # noqa: BLE001 — raised in the caller's thread, in its turn
            self._put((self._END, e))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator:
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _file_fingerprint(path: str) -> dict:
    """Size plus sha256 of the first and last MiB: cheap, and enough to notice a different file."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(1 << 20, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return {"bytes": size, "sha256_head_tail": h.hexdigest()}


class Source:
    """Base: subclasses give ``_sequences()`` (ids, mask, (doc, offset)) in order, and a fingerprint."""

    kind: str = ""

    def __init__(self, seq_len: int, packing: str, max_seqs: int | None):
        self.seq_len = seq_len
        self.packing = packing
        self.max_seqs = max_seqs

    def describe(self) -> dict:  # what identifies the input in the manifest
        raise NotImplementedError

    @property
    def n_sequences(self) -> int | None:
        """Known in advance (npy) or None (streams)."""
        return None

    def _sequences(self) -> Iterator[tuple[np.ndarray, np.ndarray | None, tuple[int, int]]]:
        raise NotImplementedError

    def blocks(self, seqs_per_block: int, wanted, check=lambda index: False) -> Iterator[Block | Skipped]:
        """Blocks in order. For a block index where ``wanted(i)`` is false a :class:`Skipped` is
        yielded instead (its sequences are still read, for streams, so that later blocks start at the
        right place), with the block's digest where ``check(i)`` is true."""
        ids, masks, srcs = [], [], []
        index = start = n = 0

        def finish():
            if wanted(index):
                return self._block(index, start, ids, masks, srcs)
            return Skipped(index, self._block(index, start, ids, masks, srcs).digest() if check(index) else None)

        for seq, mask, src in self._sequences():
            if self.max_seqs is not None and n >= self.max_seqs:
                break
            if wanted(index) or check(index):
                ids.append(seq)
                masks.append(mask)
                srcs.append(src)
            n += 1
            if n - start == seqs_per_block:
                yield finish()
                ids, masks, srcs = [], [], []
                index, start = index + 1, n
        if n > start:  # the last, partial block
            yield finish()

    def _block(self, index, start, ids, masks, srcs) -> Block:
        mask = None if masks[0] is None else np.stack(masks)
        return Block(index, start, np.stack(ids), mask, np.asarray(srcs, dtype=np.int64))


class NpySource(Source):
    kind = "npy"

    def __init__(self, path: str, seq_len: int | None, packing: str, max_seqs: int | None,
                 default_seq_len: int | None = None):
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"data: could not read {path!r} as a .npy array ({e})") from e
        if arr.dtype.kind not in "iu":
            raise ValueError(f"data: expected integer token ids in {path!r}, got dtype {arr.dtype}")
        if arr.ndim == 1:
            if packing != "pack":
                raise ValueError(f"packing: a 1-D .npy ({path!r}) is one token stream with no document "
                                 "boundaries, so only packing='pack' applies; got 'pad'")
            seq_len = seq_len or default_seq_len
            if seq_len is None:
                raise ValueError("seq_len: a 1-D .npy token stream needs seq_len (the length to cut it "
                                 "into), got None")
        elif arr.ndim == 2:
            if packing != "pack":
                raise ValueError(f"packing: a 2-D .npy ({path!r}) holds its sequences already, one per row, "
                                 "every token real, so there is nothing to pad and only packing='pack' "
                                 "(each row as it is) applies; got 'pad'")
            if arr.shape[1] == 0:
                raise ValueError(f"data: the 2-D .npy {path!r} holds sequences of length 0 (shape "
                                 f"{arr.shape}); expected [n, seq_len] with seq_len >= 1")
            if seq_len is not None and seq_len != arr.shape[1]:
                raise ValueError(f"seq_len: the 2-D .npy {path!r} holds sequences of length "
                                 f"{arr.shape[1]}; pass seq_len={arr.shape[1]} or None, got {seq_len}")
            seq_len = arr.shape[1]
        else:
            raise ValueError(f"data: expected a 1-D token stream or a 2-D [n, seq_len] array in {path!r}, "
                             f"got shape {arr.shape}")
        super().__init__(seq_len, packing, max_seqs)
        self.path, self.arr = path, arr

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "shape": list(self.arr.shape),
                "dtype": str(self.arr.dtype), **_file_fingerprint(self.path)}

    @property
    def n_sequences(self) -> int:
        n = self.arr.shape[0] if self.arr.ndim == 2 else self.arr.shape[0] // self.seq_len
        return n if self.max_seqs is None else min(n, self.max_seqs)

    def blocks(self, seqs_per_block: int, wanted, check=lambda index: False) -> Iterator[Block | Skipped]:
        # Random access: blocks nobody here wants or checks cost nothing.
        n, t = self.n_sequences, self.seq_len
        for index in range(math.ceil(n / seqs_per_block)):
            if not wanted(index) and not check(index):
                yield Skipped(index)
                continue
            a, b = index * seqs_per_block, min(n, (index + 1) * seqs_per_block)
            raw = self.arr[a:b] if self.arr.ndim == 2 else self.arr[a * t:b * t]
            if raw.dtype == np.uint64 and raw.size and (top := int(raw.max())) > np.iinfo(np.int64).max:
                raise ValueError(f"data: token id {top} in sequences {a}..{b - 1} does not fit in int64 "
                                 "(no vocabulary is that large)")
            if self.arr.ndim == 2:  # row-major whatever the array's order (Fortran, a transpose)
                ids = np.ascontiguousarray(raw, dtype=np.int64)
                src = np.stack([np.arange(a, b), np.zeros(b - a, dtype=np.int64)], 1)
            else:
                ids = np.ascontiguousarray(raw, dtype=np.int64).reshape(b - a, t)
                src = np.stack([np.zeros(b - a, dtype=np.int64), np.arange(a, b) * t], 1)
            block = Block(index, a, ids, None, src.astype(np.int64))
            yield block if wanted(index) else Skipped(index, block.digest())


class ArraySource(NpySource):
    """An in-memory array or tensor of token ids (the Python API), same rules as a .npy."""

    kind = "array"

    def __init__(self, arr, seq_len, packing, max_seqs):
        arr = np.asarray(arr.cpu() if hasattr(arr, "cpu") else arr)
        if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
            raise ValueError(f"data: expected integer token ids of shape [n_tokens] or [n, seq_len], got "
                             f"dtype {arr.dtype} shape {arr.shape}")
        if arr.ndim == 1 and packing != "pack":
            raise ValueError("packing: a 1-D token array has no document boundaries; only 'pack' applies")
        if arr.ndim == 2 and packing != "pack":
            raise ValueError("packing: a 2-D token array holds its sequences already, one per row, every "
                             "token real, so there is nothing to pad and only packing='pack' (each row as it "
                             "is) applies; got 'pad'")
        if arr.ndim == 1 and seq_len is None:
            raise ValueError("seq_len: a 1-D token array needs seq_len, got None")
        if arr.ndim == 2 and arr.shape[1] == 0:
            raise ValueError(f"data: expected sequences of length >= 1, got shape {arr.shape}")
        if arr.ndim == 2 and seq_len not in (None, arr.shape[1]):
            raise ValueError(f"seq_len: the array holds sequences of length {arr.shape[1]}, got {seq_len}")
        Source.__init__(self, seq_len or arr.shape[1], packing, max_seqs)
        self.path, self.arr = None, arr

    def describe(self) -> dict:
        a = np.ascontiguousarray(self.arr)
        return {"kind": self.kind, "shape": list(a.shape), "dtype": str(a.dtype),
                "sha256": hashlib.sha256(a.tobytes()).hexdigest()}


class DocumentSource(Source):
    """Documents (token lists) from text, JSONL or a dataset, packed or padded."""

    def __init__(self, path: str, seq_len: int | None, packing: str, max_seqs: int | None, tokenizer,
                 text_field: str | None):
        if seq_len is None:
            raise ValueError("seq_len: text and dataset inputs need seq_len (tokens per sequence), got None")
        super().__init__(seq_len, packing, max_seqs)
        # None: "text" (a dataset's input_ids column, where it has one, comes first; see DatasetSource)
        self.path, self.text_field, self.field_given = path, text_field or "text", text_field is not None
        self.tokenizer = tokenizer
        self.eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)

    def warn_if_glued(self) -> None:
        """packing="pack" with no EOS to put between documents: they run into each other."""
        if self.tokenizer is None and self.tokenizes:
            return  # an error follows: the texts need a tokenizer (_need_tokenizer)
        if self.packing == "pack" and self.eos is None:
            why = "the tokenizer has no EOS token" if self.tokenizer is not None else "no tokenizer was given"
            warnings.warn(f"packing='pack': {why}, so the documents are joined with nothing between them; "
                          "pass a tokenizer with an eos_token, or packing='pad'", UserWarning, stacklevel=3)

    @property
    def tokenizes(self) -> bool:
        """Whether the documents are texts for the tokenizer (not token ids already)."""
        return True

    def fit_pad(self, vocab: int) -> None:
        """The id padded positions hold: the tokenizer's pad token where the model can embed it, else
        its EOS, else 0. Padding is masked and never stored, but the model still embeds it."""
        if self.packing == "pad" and not 0 <= self.pad < vocab:
            self.pad = self.eos if self.eos is not None and 0 <= self.eos < vocab else 0

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"tokenizer: the {self.kind} input {self.path!r} needs a tokenizer (the "
                             "model's, or pass tokenizer= / --tokenizer DIR); got none")

    def describe(self) -> dict:
        tok = self.tokenizer
        return {"kind": self.kind, "path": os.path.abspath(self.path), "text_field": self.text_field,
                "tokenizer": None if tok is None else {
                    "class": type(tok).__name__, "vocab_size": len(tok),
                    "name_or_path": str(getattr(tok, "name_or_path", "")),
                    "eos": self.eos, "pad": self.pad},
                **self._fingerprint()}

    def _fingerprint(self) -> dict:
        return _file_fingerprint(self.path)

    def _texts(self) -> Iterator[tuple[int, str]]:
        """(document index, text) in order; the index is what ``source`` records."""
        raise NotImplementedError

    def _id_chunks(self) -> Iterator[tuple[list[int], list]]:
        """(document indices, their token id lists), a thousand documents at a time (fast tokenizers
        batch)."""
        self._need_tokenizer()
        chunk: list[str] = []
        where: list[int] = []
        for i, text in self._texts():
            chunk.append(text)
            where.append(i)
            if len(chunk) == _CHUNK_DOCS:
                yield where, self.tokenizer(chunk)["input_ids"]
                chunk, where = [], []
        if chunk:
            yield where, self.tokenizer(chunk)["input_ids"]

    def _flat_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(document indices, token counts, the tokens end to end), int64 arrays, for up to a thousand
        documents at a time: what packing and padding read, without a Python object per token."""
        for where, ids in self._id_chunks():
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
            yield np.asarray(where, dtype=np.int64), lengths, flat

    def _lines(self) -> Iterator[tuple[int, str]]:
        """(0-based line number, line without its "\\n" or "\\r\\n") of a UTF-8 file (a byte-order mark at
        its start is not text); a file that is not UTF-8 is a ValueError naming it. Lines end at "\\n"
        only, as ``wc -l``, ``sed -n Np`` and JSON Lines count them: a lone "\\r" inside a line (pasted
        or scraped text has them) neither splits its document nor shifts the numbers after it, which
        Python's universal newlines would do."""
        lineno = 0
        try:
            with open(self.path, encoding="utf-8-sig", newline="\n") as f:
                for lineno, line in enumerate(f):
                    if line.endswith("\n"):
                        line = line[:-2] if line.endswith("\r\n") else line[:-1]
                    yield lineno, line
        except UnicodeDecodeError as e:
            raise ValueError(f"data: {self.path!r} is not UTF-8 text (after line {lineno + 1}: {e})") \
                from None

    def _sequences(self):
        t = self.seq_len
        if self.packing == "pack":
            yield from pack_documents(self._flat_chunks(), t, self.eos)
            return
        for docs, lengths, flat in self._flat_chunks():
            ends = np.cumsum(lengths)
            for doc_i, start, end in zip(docs.tolist(), (ends - lengths).tolist(), ends.tolist()):
                for off in range(0, end - start, t):
                    piece = flat[start + off:min(end, start + off + t)]
                    ids = np.full(t, self.pad, dtype=np.int64)
                    ids[:len(piece)] = piece
                    mask = np.zeros(t, dtype=bool)
                    mask[:len(piece)] = True
                    yield ids, mask, (doc_i, off)


def pack_documents(chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], seq_len: int,
                   eos: int | None) -> Iterator[tuple[np.ndarray, None, tuple[int, int]]]:
    """Documents joined (``eos`` after each one that does not already end with it; an empty one adds
    nothing, not even a separator) and cut into ``seq_len`` tokens, the incomplete tail dropped: yields
    (sequence, None, (document, offset in that document of the sequence's first token)) in order.
    ``chunks``: (document indices, token counts, the tokens end to end) as ``_flat_chunks`` gives them.

    The same sequences and sources as joining the documents one token at a time, computed per chunk
    with array operations: Python once per sequence, not once per document and token (this thread
    shares the GIL with the forwards', and under torchrun every rank reads the whole input)."""
    t = seq_len
    empty = np.empty(0, dtype=np.int64)
    # The tokens after the last whole sequence, and the documents they come from, as pieces: the
    # document, where its piece starts in `carry`, and the offset in the document of that start.
    carry, c_doc, c_at, c_off = empty, empty, empty, empty
    for docs, lengths, flat in chunks:
        if not lengths.all():
            docs, lengths = docs[lengths > 0], lengths[lengths > 0]
        if not len(docs):
            continue
        ends = np.cumsum(lengths)
        if eos is not None:
            needs = flat[ends - 1] != eos
            if needs.any():  # before each index given: after that document's last token
                flat = np.insert(flat, ends[needs], eos)
                lengths = lengths + needs
                ends = np.cumsum(lengths)
        stream = np.concatenate([carry, flat])
        p_doc = np.concatenate([c_doc, docs])
        p_at = np.concatenate([c_at, ends - lengths + len(carry)])
        p_off = np.concatenate([c_off, np.zeros(len(docs), dtype=np.int64)])
        n = len(stream) // t
        firsts = np.arange(n, dtype=np.int64) * t
        piece = np.searchsorted(p_at, firsts, side="right") - 1  # the piece each sequence starts in
        src_doc, src_off = p_doc[piece].tolist(), (p_off[piece] + firsts - p_at[piece]).tolist()
        for k in range(n):
            yield stream[k * t:(k + 1) * t], None, (src_doc[k], src_off[k])
        done = n * t
        carry = stream[done:].copy()  # not a view: it would keep the whole chunk alive
        if len(carry):
            k = int(np.searchsorted(p_at, done, side="right")) - 1
            c_doc, c_at, c_off = p_doc[k:], p_at[k:] - done, p_off[k:].copy()
            c_off[0] += done - p_at[k]
            c_at[0] = 0
        else:
            c_doc = c_at = c_off = empty


class TextSource(DocumentSource):
    """One document per line of a UTF-8 text file, numbered by line; a blank line is an empty
    document (nothing, in either packing)."""

    kind = "text"

    def describe(self) -> dict:
        # Recorded so that a run started when documents were numbered by non-blank line (before
        # 0.1's line numbering) is refused on resume as other settings, not as changed data.
        return {**super().describe(), "documents": "one per line, numbered by line"}

    def _texts(self):
        for lineno, line in self._lines():
            if line.strip():
                yield lineno, line


class JsonlSource(DocumentSource):
    """One JSON object per line; the document is its ``text_field``."""

    kind = "jsonl"

    def _texts(self):
        record = 0  # the document index: records, not lines (blank lines are neither)
        for lineno, line in self._lines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data: line {lineno + 1} of {self.path!r} is not valid JSON ({e}); "
                                 "expected JSON Lines: one JSON object per line") from e
            if not isinstance(obj, dict):
                kind = {list: "a JSON array", str: "a JSON string", bool: "a JSON boolean", int: "a JSON number",
                        float: "a JSON number", type(None): "JSON null"}.get(type(obj), type(obj).__name__)
                raise ValueError(f"data: line {lineno + 1} of {self.path!r} is {kind}; expected JSON Lines "
                                 "with one JSON object per line, each with the document in a field "
                                 f"({self.text_field!r})")
            if self.text_field not in obj:
                raise ValueError(f"text_field: line {lineno + 1} of {self.path!r} has no field "
                                 f"{self.text_field!r} (it has {sorted(obj)}); pass text_field= / --text-field")
            text = obj[self.text_field]
            if not isinstance(text, str):
                raise ValueError(f"text_field: line {lineno + 1} of {self.path!r}: expected the field "
                                 f"{self.text_field!r} to be a string, got {type(text).__name__}")
            yield record, text
            record += 1


class DatasetSource(DocumentSource):
    """A dataset saved with ``datasets``' ``save_to_disk``: an ``input_ids`` column (already tokenized)
    or a text column."""

    kind = "hf_dataset"

    def __init__(self, path, seq_len, packing, max_seqs, tokenizer, text_field, split):
        super().__init__(path, seq_len, packing, max_seqs, tokenizer, text_field)
        try:
            import datasets
        except ImportError as e:
            raise ValueError(f"data: {path!r} looks like a saved HF dataset, which needs the `datasets` "
                             "package (pip install 'residtap[data]' or pip install datasets)") from e
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"data: {path!r} could not be loaded as a dataset saved with save_to_disk "
                             f"({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
            if split not in ds:
                raise ValueError(f"split: the dataset {path!r} has splits {sorted(ds)}; got {split!r}")
            ds = ds[split]
        elif split is not None and str(ds.split) != split:
            have = "no split name" if ds.split is None else f"the split {str(ds.split)!r}"
            raise ValueError(f"split: {path!r} holds one Dataset ({have}), not a DatasetDict of splits; "
                             f"got {split!r} (pass no split)")
        self.split = split
        self.ds = ds
        cols = ds.column_names
        # A text_field asked for is read (tokenized) even where the dataset has input_ids too.
        self.column = "input_ids" if "input_ids" in cols and not self.field_given else self.text_field
        if self.column not in cols:
            raise ValueError(f"text_field: the dataset {path!r} has columns {cols}, neither 'input_ids' "
                             f"nor {self.text_field!r}; pass text_field= / --text-field")

    @property
    def tokenizes(self) -> bool:
        return self.column != "input_ids"

    def _fingerprint(self) -> dict:
        return {"split": self.split, "rows": len(self.ds), "column": self.column,
                "dataset_fingerprint": getattr(self.ds, "_fingerprint", None)}

    def _texts(self):
        row = 0
        for batch in self.ds.iter(batch_size=1000):
            for text in batch[self.column]:
                if not isinstance(text, str):
                    raise ValueError(f"text_field: row {row} of the dataset {self.path!r}: expected the "
                                     f"column {self.column!r} to hold strings, got {type(text).__name__}")
                yield row, text
                row += 1

    def _flat_chunks(self):
        """A text column through the tokenizer; an ``input_ids`` column as Arrow holds it, a thousand
        rows at a time, without a Python object per token."""
        if self.column != "input_ids":
            yield from super()._flat_chunks()
            return
        import pyarrow as pa
        import pyarrow.compute as pc

        row = 0
        for table in self.ds.with_format("arrow").iter(batch_size=_CHUNK_DOCS):
            col = table.column("input_ids").combine_chunks()
            kind = col.type
            lists = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
            if not lists or not pa.types.is_integer(kind.value_type):
                raise ValueError(f"data: the dataset {self.path!r} has an 'input_ids' column of {kind}; "
                                 "expected lists of integer token ids")
            if col.null_count:
                first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"data: row {row + first} of the dataset {self.path!r} has no input_ids "
                                 "(null); expected a list of token ids")
            values = pc.list_flatten(col)
            if values.null_count:
                raise ValueError(f"data: the dataset {self.path!r} has a null token id in its 'input_ids' "
                                 f"(rows {row} to {row + len(col) - 1}); expected integer token ids")
            flat = values.to_numpy()
            if flat.dtype == np.uint64 and len(flat) and flat.max() > np.iinfo(np.int64).max:
                raise ValueError(f"data: the dataset {self.path!r} has a token id of {int(flat.max())} in its "
                                 f"'input_ids' (rows {row} to {row + len(col) - 1}), past int64")
            lengths = pc.list_value_length(col).to_numpy().astype(np.int64, copy=False)
            yield np.arange(row, row + len(col), dtype=np.int64), lengths, flat.astype(np.int64, copy=False)
            row += len(col)


_KIND_NAMES = {"array": "token ids", "npy": "token ids (.npy)", "text": "plain text, a document a line",
               "jsonl": "JSON lines", "hf_dataset": "a saved dataset"}


def open_source(data, *, seq_len: int | None, packing: str, max_tokens: int | None, tokenizer=None,
                text_field: str | None = None, split: str | None = None,
                default_seq_len: int | None = None) -> Source:
    """Pick the source for ``data``: a path (.npy, .txt, .jsonl, a saved dataset directory) or an array.

    ``seq_len`` None: a 2-D array's width, else ``default_seq_len``."""
    if packing not in PACKINGS:
        raise ValueError(f"packing: expected one of {PACKINGS}, got {packing!r}")
    seq_len = positive_int(seq_len, "seq_len", none_ok=True)
    max_tokens = positive_int(max_tokens, "max_tokens", none_ok=True)
    width_from_data = (hasattr(data, "shape") and len(data.shape) == 2) or (  # maybe: a .npy decides
        isinstance(data, (str, os.PathLike)) and os.fspath(data).lower().endswith(".npy"))
    if seq_len is None and not width_from_data:
        seq_len = default_seq_len

    def cap(t):  # max_tokens → whole sequences: the first ceil(max_tokens / seq_len)
        return None if max_tokens is None or t is None else math.ceil(max_tokens / t)

    def applies(kind: str) -> None:  # a setting the input would ignore is refused, not dropped
        what = f"the input {os.fspath(data)!r}" if isinstance(data, (str, os.PathLike)) else "an array"
        if text_field is not None and kind not in ("jsonl", "hf_dataset"):
            raise ValueError(f"text_field: applies to .jsonl files and saved datasets, whose records have "
                             f"fields; {what} is {_KIND_NAMES[kind]}, got {text_field!r}")
        if split is not None and kind != "hf_dataset":
            raise ValueError(f"split: applies to a saved HF dataset directory; {what} is "
                             f"{_KIND_NAMES[kind]}, got {split!r}")

    if not isinstance(data, (str, os.PathLike)):
        if not hasattr(data, "shape"):
            raise ValueError(f"data: expected a path or an array/tensor of token ids, "
                             f"got {type(data).__name__}")
        applies("array")
        width = data.shape[1] if len(data.shape) == 2 else (seq_len or default_seq_len)
        return ArraySource(data, seq_len if len(data.shape) == 2 else width, packing,
                           cap(width) if width else None)
    path = os.fspath(data)
    if not os.path.exists(path):
        raise ValueError(f"data: {path!r} does not exist")
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json",
                                                                     "dataset_dict.json")):
            raise ValueError(f"data: the directory {path!r} is not a dataset saved with save_to_disk "
                             "(no dataset_info.json / dataset_dict.json)")
        applies("hf_dataset")
        return DatasetSource(path, seq_len, packing, cap(seq_len), tokenizer, text_field, split)
    lower = path.lower()
    if lower.endswith(".npy"):
        applies("npy")
        src = NpySource(path, seq_len, packing, None, default_seq_len)
        src.max_seqs = cap(src.seq_len)
        return src
    if lower.endswith(TEXT_SUFFIXES):
        applies("text")
        return TextSource(path, seq_len, packing, cap(seq_len), tokenizer, text_field)
    if lower.endswith(JSONL_SUFFIXES):
        applies("jsonl")
        return JsonlSource(path, seq_len, packing, cap(seq_len), tokenizer, text_field)
    raise ValueError(f"data: expected a .npy, .txt, .jsonl file or a saved HF dataset directory, "
                     f"got {path!r}")
