"""Nothing lost, nothing silently wrong: each damaged input or mismatched resume is an exit-2
paragraph naming the file or flag, and what was on disk before is still there afterwards."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from memfit.cli import main
from pipelines.prepare import prepare
from runtime import checkpoint
from runtime.checkpoint import LATEST, STATE, TENSORS, checkpoints

BASE = ["train", "gpt2-tiny", "--batch", "2", "--seq", "16", "--warmup", "1", "--val-every", "0"]
RUN = [*BASE, "--steps", "4", "--checkpoint-every", "2"]


@pytest.fixture(autouse=True)
def _quiet(one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the data-verification cache
    yield


@pytest.fixture(scope="module")
def data(passes_data: Path) -> Path:
    return passes_data


@pytest.fixture(scope="module")
def finished(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code, text = _run(*RUN, "--data", str(data), "--out", str(out))
    assert code == 0, text
    return out


def _run(*args: str) -> tuple[int, str]:
    """Exit code and output with all white space removed (rich wraps long paths anywhere)."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, "".join(result.output.split())


def _says(text: str, *needles: str) -> bool:
    return all("".join(needle.split()) in text for needle in needles)


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


# --- resume checks the run's settings ------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        (["--grad-accum", "2"], "--grad-accum 1 (this command: 2)"),
        (["--seq", "8"], "--seq 16 (this command: 8)"),
        (["--precision", "bf16"], "--precision fp32 (this command: bf16)"),
        (["--lora", "r=4"], "--lora none (this command: r=4,alpha=16,targets=q,k,v,o)"),
        (["--batch", "4"], "--batch 2 (this command: 4)"),
        (["--lora", "r=8", "--quantize-base", "int8"], "--quantize-base none (this command: int8)"),
        (["--model", "llama-tiny"], "MODEL gpt2-tiny (this command: llama-tiny)"),
    ],
)
def test_resume_with_other_settings_is_refused_by_flag(
    finished: Path, data: Path, tmp_path: Path, change: list[str], flag: str
) -> None:
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    args = [*RUN, *change]
    if change[0] == "--model":
        args = [RUN[0], change[1], *RUN[2:]]
    code, text = _run(*args, "--data", str(data), "--out", str(out), "--resume")
    assert code == 2, text
    assert "Traceback" not in text and _says(text, "step-00000004 was written with")
    assert _says(text, flag), text
    assert _snapshot(out) == before


def test_resume_on_other_data_is_refused(finished: Path, data: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-data"
    root = Path(__file__).resolve().parents[1]
    files = [p for p in sorted((root / "runtime").glob("*.py")) if p.stat().st_size]
    prepare(files, other, "byte", val_fraction=0.0, progress=False)
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    code, text = _run(*RUN, "--data", str(other), "--out", str(out), "--resume", "--steps", "6")
    assert code == 2 and _says(text, "--data train split sha256"), text
    assert _snapshot(out) == before


def test_a_rerun_after_a_kill_before_the_first_checkpoint_starts_clean(
    data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    (out / "checkpoints" / ".tmp-step-00000002-999").mkdir(parents=True)  # killed mid-write
    code, text = _run(*RUN, "--data", str(data), "--out", str(out))
    assert code == 0, text
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        LATEST,
        "step-00000002",
        "step-00000004",
    ]


# --- damaged checkpoints ----------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize(
    ("harm", "named", "used"),
    [
        (lambda c: _flip(c / TENSORS, -100), f"{TENSORS}: sha256 differs", 2),
        (lambda c: _truncate(c / TENSORS), f"{TENSORS} has 1000 bytes", 2),
        (lambda c: (c / STATE).unlink(), f"{STATE} is missing", 2),
        (lambda c: (c / STATE).write_text("{"), f"{STATE} has 1 bytes", 2),
        (lambda c: (c.parent / LATEST).write_text("step-00000009\n"), "names step-00000009", 4),
    ],
    ids=["flipped-weights", "truncated-weights", "no-state", "bad-state", "dangling-latest"],
)
def test_a_damaged_latest_checkpoint_resumes_from_the_intact_one(
    finished: Path, data: Path, tmp_path: Path, harm: object, named: str, used: int
) -> None:
    out = _copy(finished, tmp_path)
    harm(out / "checkpoints" / "step-00000004")  # type: ignore[operator]
    code, text = _run(*RUN, "--data", str(data), "--out", str(out), "--resume")
    assert code == 0, text
    assert _says(text, f"resuming from {out}/checkpoints/step-0000000{used}, the newest intact")
    assert _says(text, named), text
    assert _losses(out) == _losses(finished)  # steps 3 and 4 again, on the intact weights


def test_no_intact_checkpoint_is_exit_2_and_keeps_them_all(
    finished: Path, data: Path, tmp_path: Path
) -> None:
    out = _copy(finished, tmp_path)
    for path in checkpoints(out / "checkpoints"):
        _flip(path / TENSORS, -100)
    before = _snapshot(out)
    code, text = _run(*RUN, "--data", str(data), "--out", str(out), "--resume")
    assert code == 2 and "Traceback" not in text, text
    assert _says(text, "no intact checkpoint in")
    for step in (2, 4):
        assert _says(text, f"step-0000000{step}/tensors.safetensors: sha256 differs"), text
    assert _snapshot(out) == before


def test_a_full_disk_at_a_checkpoint_exits_2_and_the_previous_one_resumes(
    finished: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = checkpoint.save_file
    calls = []

    def fills_up(tensors: dict, path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:  # the step-4 checkpoint: half a file, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    out = tmp_path / "run"
    code, text = _run(*RUN, "--data", str(data), "--out", str(out))
    assert code == 2 and "Traceback" not in text, text
    assert _says(text, "step-00000004 failed: No space left on device")
    assert _says(text, "step-00000002 is intact")
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()
    code, text = _run(*RUN, "--data", str(data), "--out", str(out), "--resume")
    assert code == 0, text
    assert _losses(out) == _losses(finished)


def test_keep_checkpoints(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*BASE, "--steps", "3", "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    code, text = _run(*args, "--data", str(data), "--out", str(out))
    assert code == 0, text
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000003"]
    code, text = _run(*args, "--keep-checkpoints", "0", "--data", str(data), "--out", str(out))
    assert code == 2 and _says(text, "'--keep-checkpoints'")


# --- damaged data -------------------------------------------------------------------------


def _reseal(directory: Path) -> None:
    """Record the train file's current sha256 in the manifest, as if prepared that way."""
    manifest = json.loads((directory / "manifest.json").read_text())
    info = manifest["splits"]["train"]
    info["sha256"] = hashlib.sha256((directory / info["file"]).read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _last_token(directory: Path) -> int:
    """Offset of the train file's last token id (uint16), past the Arrow footer."""
    import pyarrow as pa

    path = directory / "train.arrow"
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    column = reader.get_batch(0).column("tokens")
    buffer = column.buffers()[1]
    start = path.read_bytes().find(buffer.to_pybytes()[:64])
    return start + 2 * (len(column) - 1)


@pytest.mark.parametrize(
    ("harm", "named"),
    [
        (lambda d: _flip(d / "train.arrow", _last_token(d)), "train.arrow: sha256 differs"),
        (lambda d: _truncate(d / "train.arrow"), "train.arrow: 1000 bytes, the manifest says"),
        (
            lambda d: (_flip(d / "train.arrow", _last_token(d) + 1), _reseal(d)),
            "train.arrow: token id",
        ),
    ],
    ids=["flipped", "truncated", "id-past-vocab"],
)
def test_damaged_data_stops_before_the_first_step(
    data: Path, tmp_path: Path, harm: object, named: str
) -> None:
    damaged = tmp_path / "data"
    shutil.copytree(data, damaged)
    harm(damaged)  # type: ignore[operator]
    before = _snapshot(damaged)
    out = tmp_path / "run"
    code, text = _run(*RUN, "--data", str(damaged), "--out", str(out))
    assert code == 2 and "Traceback" not in text, text
    assert _says(text, named), text
    assert not (out / "metrics.jsonl").exists()
    assert _snapshot(damaged) == before


def test_verified_data_is_read_once(data: Path, tmp_path: Path) -> None:
    """The second run trusts the cache (same size and mtime); a changed mtime re-verifies."""
    from pipelines import integrity

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    cache = tmp_path / "cache"
    integrity.verified_dataset(copy, "train", cache)
    entry = json.loads((cache / integrity.CACHE_NAME).read_text())
    assert list(entry) == [str((copy / "train.arrow").resolve())]
    _flip(copy / "train.arrow", _last_token(copy))
    stat = (copy / "train.arrow").stat()
    import os

    os.utime(copy / "train.arrow", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(integrity.DataError, match="sha256 differs"):
        integrity.verified_dataset(copy, "train", cache)


def test_prepare_of_an_empty_directory_never_replaces_data(data: Path, tmp_path: Path) -> None:
    kept = tmp_path / "data"
    shutil.copytree(data, kept)
    before = _snapshot(kept)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden").write_text("skipped")
    for extra in ([], ["--overwrite"]):  # the empty input is named before the existing data
        code, text = _run("prepare", str(empty), "--out", str(kept), *extra)
        assert code == 2 and _says(text, f"{empty}: directory holds no input files"), text
    assert _snapshot(kept) == before


# --- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--seq", "0"], "--seq must be ≥ 1, got 0"),
        (["--seq", "-5"], "--seq must be ≥ 1, got -5"),
        (["--batch", "0"], "--batch must be ≥ 1, got 0"),
        (["--grad-accum", "0"], "--grad-accum must be ≥ 1, got 0"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--weight-decay", "-1"], "--weight-decay must be a number ≥ 0, got -1.0"),
        (["--dp", "3"], "--dp 3 --tp 1 needs 3 processes, but 1 was launched"),
        (["--tp", "3"], "--tp 3 does not divide the 1 process(es) launched"),
    ],
)
def test_bad_numbers_name_the_flag(data: Path, tmp_path: Path, args: list[str], named: str) -> None:
    code, text = _run(*RUN, *args, "--data", str(data), "--out", str(tmp_path / "r"))
    assert code == 2 and _says(text, named) and "Traceback" not in text, text


def test_an_unwritable_out_is_one_paragraph(data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, text = _run(*RUN, "--data", str(data), "--out", str(blocker / "run"))
    assert code == 2 and "Traceback" not in text, text
    assert _says(text, f"--out {blocker / 'run'}: cannot write") and _says(text, "Not a directory")
    assert blocker.read_text() == "not a directory"


def test_debug_is_accepted_after_the_subcommand(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["compile", "gpt3-huge", "--debug"])
    assert result.exit_code != 0 and result.exception is not None
    assert "MODEL 'gpt3-huge'" in str(result.exception)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["--format", "png", "--out", "p.png"],
            "--format png, --out p.png: not planned with a mesh",
        ),
        (["--lora", "r=8"], "--lora r=8: not planned with a mesh"),
        (["--sweep"], "--sweep: not planned with a mesh"),
        (["--memory-budget", "0.5"], "--memory-budget 0.5: a fraction of the activation memory"),
    ],
)
def test_plan_refuses_what_a_mesh_plan_would_ignore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], named: str
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, text = _run("plan", "gpt2-tiny", "--dp", "2", *args)
    assert code == 2 and _says(text, named), text
    assert list(cwd.iterdir()) == []  # refused before planning: no half-written file


def test_compile_shows_bytes_at_the_peak_not_summed_declarations(tmp_path: Path) -> None:
    code, text = _run("compile", "gpt2-tiny", "--batch", "2", "--seq", "16", "--out", str(tmp_path))
    assert code == 0, text
    assert _says(text, "at the step's peak") and "declaredbytes" not in text
    rows = dict(re.findall(r"│(\w+)│([\d.]+[KMG]?i?B)│", text))
    sizes = {role: _bytes(size) for role, size in rows.items()}
    assert "activation" in sizes and "peak" in text
    peak = _bytes(re.search(r"steppeak│([\d.]+[KMG]?i?B)", text).group(1))  # type: ignore[union-attr]
    assert all(n <= peak for n in sizes.values()), (sizes, peak)


def _bytes(text: str) -> float:
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]
