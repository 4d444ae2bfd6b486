"""loader: a prepared split, memory-mapped, cut into shuffled [B, T] training batches.

Window i is tokens[i*T : i*T + T + 1]: stride T, so within an epoch every token is an input
exactly once and documents are packed across their EOS boundaries. Each epoch shuffles all
windows with a permutation drawn from (seed, epoch); rank r takes the r-th contiguous slice of
W // world_size windows, so ranks never overlap and all drop the same remainder (the last windows
of the permutation, different ones each epoch). A batch is one gather of B window rows.

The loader's position counts batches *delivered*, never batches prefetched, so a state_dict
taken at any step resumes with exactly the batch that would have come next.
"""

import hashlib
import math
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.errors import DataError
from pipelines.manifest import Manifest, SplitInfo

STATE_VERSION = 1
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TokenDataset:
    """A 1-D tensor of token ids; from `open`, a zero-copy view of a memory-mapped Arrow file.

    A mapped tensor is read-only memory: writing to it crashes the process.
    """

    tokens: torch.Tensor
    manifest: Manifest | None = None

    @classmethod
    def open(
        cls, directory: Path | str, split: str = "train", verify_checksum: bool = False
    ) -> "TokenDataset":
        """Map one split of a prepared directory, checking it against the manifest.

        Size, dtype and token count are always checked; the sha256 only if `verify_checksum`
        (it reads the whole file).
        """
        directory = Path(directory)
        manifest = Manifest.load(directory)
        if split not in manifest.splits:
            raise DataError(f"{directory}: no split {split!r}; it has {', '.join(manifest.splits)}")
        info = manifest.splits[split]
        path = directory / info.file
        if info.tokens == 0:
            raise DataError(f"{path}: split {split!r} is empty (val_fraction too small?)")
        _check_file(path, info, verify_checksum)
        return cls(_map_tokens(path, np.dtype(manifest.dtype), info.tokens), manifest)

    def __len__(self) -> int:
        return self.tokens.numel()


def _check_file(path: Path, info: SplitInfo, verify_checksum: bool) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    if size != info.bytes:
        raise DataError(f"{path}: {size} bytes, the manifest says {info.bytes} (truncated?)")
    if verify_checksum:
        with path.open("rb") as fh:
            if hashlib.file_digest(fh, "sha256").hexdigest() != info.sha256:
                raise DataError(f"{path}: sha256 differs from the manifest (corrupt file)")


def _map_tokens(path: Path, dtype: np.dtype, count: int) -> torch.Tensor:
    """The file's one `tokens` column as a tensor over the memory map."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        if reader.num_record_batches != 1:
            raise DataError(f"{path}: {reader.num_record_batches} record batches, expected 1")
        column = reader.get_batch(0).column("tokens")
    except (OSError, KeyError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable token file ({e})") from e
    if column.type != pa.from_numpy_dtype(dtype) or len(column) != count:
        raise DataError(
            f"{path}: {len(column)} tokens of {column.type}, the manifest says {count} of {dtype}"
        )
    values = column.to_numpy(zero_copy_only=True)
    with warnings.catch_warnings():  # read-only by design, see TokenDataset
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(values)


@dataclass(frozen=True)
class _Plan:
    """Everything that fixes the batch sequence except the seed; shared with the prefetcher."""

    windows: np.ndarray  # [num_windows, T + 1] strided view of the tokens, no copy
    batch_size: int
    rank: int
    per_rank: int  # windows each rank takes per epoch
    batches_per_epoch: int
    pin_memory: bool

    def batches(self, seed: int, epoch: int, batch: int) -> Iterator[tuple[int, int, Batch]]:
        """Yield (epoch, batch index, batch) forever, starting at `batch` of `epoch`."""
        while True:
            order = self._rank_windows(seed, epoch)
            for b in range(batch, self.batches_per_epoch):
                rows = self.windows[order[b * self.batch_size : (b + 1) * self.batch_size]]
                inputs = torch.from_numpy(rows[:, :-1].astype(np.int64))
                targets = torch.from_numpy(rows[:, 1:].astype(np.int64))
                if self.pin_memory:
                    inputs, targets = inputs.pin_memory(), targets.pin_memory()
                yield epoch, b, (inputs, targets)
            epoch, batch = epoch + 1, 0

    def _rank_windows(self, seed: int, epoch: int) -> np.ndarray:
        digest = hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        order = torch.randperm(len(self.windows), generator=generator)
        return order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank].numpy()


class WindowLoader:
    """Infinite iterator of (inputs [B, T], targets [B, T]) int64 batches; see the module doc.

    `prefetch` > 0 builds that many batches ahead on a background thread; `pin_memory` pins
    them (CUDA only) so the copy to the GPU can be asynchronous.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1 or seq_len < 1 or prefetch < 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad loader arguments: batch_size={batch_size}, seq_len={seq_len}, "
                f"prefetch={prefetch}, rank={rank}, world_size={world_size}"
            )
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory needs CUDA")
        tokens = dataset.tokens.contiguous().numpy()
        num_windows = max(len(tokens) - 1, 0) // seq_len
        per_rank = num_windows // world_size
        batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        if batches == 0:
            raise ValueError(
                f"{len(tokens)} tokens make {num_windows} windows of {seq_len}+1, too few for "
                f"{world_size} rank(s) × batch_size {batch_size}"
            )
        item = tokens.itemsize
        windows = np.lib.stride_tricks.as_strided(
            tokens, (num_windows, seq_len + 1), (seq_len * item, item), writeable=False
        )
        self._plan = _Plan(windows, batch_size, rank, per_rank, batches, pin_memory)
        self._config = {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "world_size": world_size,
            "drop_last": drop_last,
            "num_tokens": len(tokens),
        }
        self._prefetch = prefetch
        self._seed, self._epoch, self._batch = seed, 0, 0
        self._next: Callable[[], tuple[int, int, Batch]] | None = None
        self._prefetcher: _Prefetcher | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self._plan.batches_per_epoch

    def __iter__(self) -> "WindowLoader":
        return self

    def __next__(self) -> Batch:
        if self._next is None:
            batches = self._plan.batches(self._seed, self._epoch, self._batch)
            if self._prefetch:
                self._prefetcher = _Prefetcher(batches, self._prefetch)
                self._next = self._prefetcher.get
            else:
                self._next = batches.__next__
        epoch, batch, item = self._next()
        batch += 1
        if batch == self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self._epoch, self._batch = epoch, batch
        return item

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch is batch `batch` of epoch `epoch`."""
        return {
            "version": STATE_VERSION,
            "seed": self._seed,
            "epoch": self._epoch,
            "batch": self._batch,
            **self._config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (any rank's: ranks move in lockstep) with the same next batch."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected 1")
        differ = {k: (state.get(k), v) for k, v in self._config.items() if state.get(k) != v}
        if differ:
            raise ValueError(f"loader state does not fit this loader (state, loader): {differ}")
        self.close()
        self._seed, self._epoch, self._batch = state["seed"], state["epoch"], state["batch"]

    def close(self) -> None:
        """Stop the prefetch thread; iterating again restarts from the delivered position."""
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._next = self._prefetcher = None

    def __enter__(self) -> "WindowLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Prefetcher:
    """Drains an iterator on a daemon thread into a queue at most `depth` items deep."""

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        # The thread must not hold `self`, or an abandoned loader would never be collected.
        self._thread = threading.Thread(
            target=_fill, args=(source, self._queue, self._stop), daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    def get(self) -> Any:
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def _fill(source: Iterator[Any], out: queue.Queue[Any], stop: threading.Event) -> None:
    try:
        for item in source:
            if not _put(out, item, stop):
                return
    except BaseException as e:  # handed to the consumer, raised there
        _put(out, _Failure(e), stop)


def _put(out: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put `item`, waiting for room until `stop` is set; False if stopped."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False
