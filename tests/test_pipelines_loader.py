"""loader: exact coverage across ranks, exact resume, zero-copy mapping, clear file errors."""

import gc
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from pipelines.errors import DataError
from pipelines.loader import TokenDataset, WindowLoader
from pipelines.prepare import prepare
from tests.strategies import examples


def positions(n: int) -> TokenDataset:
    """Token i has value i, so every batch row tells which window it came from."""
    return TokenDataset(torch.arange(n, dtype=torch.int64))


def take(loader: WindowLoader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(count)]


@examples(60)
@given(
    n=st.integers(2, 2000),
    seq_len=st.integers(1, 16),
    batch_size=st.integers(1, 5),
    world_size=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_one_epoch_covers_each_window_once_across_ranks(
    n: int, seq_len: int, batch_size: int, world_size: int, drop_last: bool, seed: int
) -> None:
    windows = (n - 1) // seq_len
    per_rank = windows // world_size
    assume(per_rank >= batch_size)
    starts: list[int] = []
    for rank in range(world_size):
        loader = WindowLoader(
            positions(n), batch_size, seq_len, seed, rank, world_size, drop_last, prefetch=0
        )
        for inputs, targets in take(loader, loader.batches_per_epoch):
            assert inputs.dtype == targets.dtype == torch.int64
            assert inputs.shape[1] == targets.shape[1] == seq_len
            assert torch.equal(targets, inputs + 1), "targets are inputs shifted by one"
            offsets = inputs - inputs[:, :1]
            assert torch.equal(offsets, torch.arange(seq_len).expand_as(inputs))
            starts += inputs[:, 0].tolist()
    assert len(starts) == len(set(starts)), "no window twice, within or across ranks"
    assert all(s % seq_len == 0 and s // seq_len < windows for s in starts)
    delivered = per_rank - per_rank % batch_size if drop_last else per_rank
    assert len(starts) == world_size * delivered
    if world_size == 1 and not drop_last:
        covered = torch.cat([torch.arange(s, s + seq_len) for s in starts]).sort().values
        assert torch.equal(covered, torch.arange(windows * seq_len)), "each token once"


@examples(40)
@given(
    n=st.integers(40, 600),
    seq_len=st.integers(1, 8),
    batch_size=st.integers(1, 4),
    world_size=st.integers(1, 3),
    step=st.integers(0, 40),
    prefetch=st.sampled_from([(0, 0), (0, 2), (3, 0), (1, 1)]),
)
def test_resume_gives_identical_following_batches(
    n: int,
    seq_len: int,
    batch_size: int,
    world_size: int,
    step: int,
    prefetch: tuple[int, int],
) -> None:
    assume((n - 1) // seq_len // world_size >= batch_size)
    rank = world_size - 1
    dataset = positions(n)
    with WindowLoader(
        dataset, batch_size, seq_len, 7, rank, world_size, prefetch=prefetch[0]
    ) as first:
        take(first, step)
        state = json.loads(json.dumps(first.state_dict()))
        following = take(first, first.batches_per_epoch + 2)  # crosses an epoch boundary
    # Another seed argument and rank 0's position: the state decides (ranks move in lockstep).
    with WindowLoader(
        dataset, batch_size, seq_len, 99, rank, world_size, prefetch=prefetch[1]
    ) as resumed:
        resumed.load_state_dict(state)
        for (x, y), (rx, ry) in zip(following, take(resumed, len(following)), strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_epochs_and_seeds_change_the_order() -> None:
    dataset = positions(10_001)  # 1000 windows: whole batches, nothing dropped

    def epoch_starts(seed: int, epoch: int) -> list[int]:
        loader = WindowLoader(dataset, 4, 10, seed, prefetch=0)
        take(loader, epoch * loader.batches_per_epoch)
        assert loader.state_dict()["epoch"] == epoch and loader.state_dict()["batch"] == 0
        return [s for x, _ in take(loader, loader.batches_per_epoch) for s in x[:, 0].tolist()]

    base = epoch_starts(0, 0)
    assert base == epoch_starts(0, 0)
    assert base != epoch_starts(1, 0)
    assert base != epoch_starts(0, 1)
    assert sorted(base) == sorted(epoch_starts(0, 1)) == sorted(epoch_starts(1, 0))


def test_prefetch_delivers_the_same_stream() -> None:
    dataset = positions(5_000)
    with (
        WindowLoader(dataset, 3, 16, 5, prefetch=0) as plain,
        WindowLoader(dataset, 3, 16, 5, prefetch=4) as ahead,
    ):
        for (x, y), (px, py) in zip(take(plain, 250), take(ahead, 250), strict=True):
            assert torch.equal(x, px) and torch.equal(y, py)
        assert plain.state_dict() == ahead.state_dict()


def test_prefetch_threads_end_on_close_and_on_garbage_collection() -> None:
    before = threading.active_count()
    with WindowLoader(positions(1_000), 2, 8, prefetch=2) as loader:
        next(loader)
        assert threading.active_count() == before + 1
    assert threading.active_count() == before
    abandoned = WindowLoader(positions(1_000), 2, 8, prefetch=2)
    next(abandoned)
    del abandoned
    gc.collect()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_bad_arguments_and_foreign_state() -> None:
    dataset = positions(100)
    with pytest.raises(ValueError, match="too few"):
        WindowLoader(dataset, 4, 30)
    with pytest.raises(ValueError, match="bad loader arguments"):
        WindowLoader(dataset, 2, 4, rank=2, world_size=2)
    state = WindowLoader(dataset, 2, 4, prefetch=0).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        WindowLoader(dataset, 2, 5, prefetch=0).load_state_dict(state)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory"):
            WindowLoader(dataset, 2, 4, pin_memory=True)


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    source = tmp_path / "doc.txt"
    source.write_text("token stream for the loader tests ✓\n" * 500, encoding="utf-8")
    prepare([source], tmp_path / "data", val_fraction=0.0, progress=False)
    return tmp_path / "data"


def mapped_file(address: int) -> str:
    """The file backing `address` in this process's memory map, or '' if anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return rest[4] if len(rest) == 5 else ""
    raise AssertionError(f"address {address:#x} is not mapped")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_tokens_are_a_zero_copy_view_of_the_file(prepared: Path) -> None:
    dataset = TokenDataset.open(prepared, verify_checksum=True)
    tokens = dataset.tokens
    assert tokens.dtype == torch.uint16 and len(dataset) == dataset.manifest.splits["train"].tokens
    first, last = tokens.data_ptr(), tokens.data_ptr() + tokens.nbytes - 1
    assert mapped_file(first) == mapped_file(last) == str((prepared / "train.arrow").resolve())
    text = bytes(tokens[:5].tolist()).decode()
    assert text == "token"


def corrupt(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_damaged_files_raise_data_error_naming_them(prepared: Path) -> None:
    train = prepared / "train.arrow"
    original = train.read_bytes()

    train.write_bytes(original[: len(original) // 2])
    with pytest.raises(DataError, match=f"{train}: .* bytes, the manifest says"):
        TokenDataset.open(prepared)

    train.write_bytes(original)
    corrupt(train, len(original) - 8, b"garbage!")  # the footer
    with pytest.raises(DataError, match=f"{train}: not a readable token file"):
        TokenDataset.open(prepared)

    train.write_bytes(original)
    corrupt(train, len(original) // 2, b"\xff\xff")  # inside the token data
    TokenDataset.open(prepared)  # undetectable without the checksum...
    with pytest.raises(DataError, match=f"{train}: sha256 differs"):
        TokenDataset.open(prepared, verify_checksum=True)

    with pytest.raises(DataError, match="split 'val' is empty"):
        TokenDataset.open(prepared, "val")
    with pytest.raises(DataError, match="no split 'test'"):
        TokenDataset.open(prepared, "test")
    (prepared / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json: no manifest"):
        TokenDataset.open(prepared)


def test_loader_over_prepared_data(prepared: Path) -> None:
    dataset = TokenDataset.open(prepared)
    with WindowLoader(dataset, 8, 64, seed=3) as loader:
        inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (8, 64)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert inputs.max() < 256
