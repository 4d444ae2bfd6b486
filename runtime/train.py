"""The training loop: compiled step, Arrow batches, LR schedule, validation, exact resume.

Everything that decides the next step's numbers — parameters, AdamW moments, the step count
and the loader's position — is in the checkpoint, so a run killed at any instant and resumed
with `resume=True` logs the same loss at every step as a run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compiler.compile import CompileOptions, compile_model, example_batch
from compiler.errors import MemfitError
from compiler.lora import LoraConfig
from compiler.mesh import Mesh, MeshError
from compiler.models import resolve_model
from compiler.passes.precision import Precision
from compiler.passes.shard import DEFAULT_BUCKET_BYTES, parallel_loss
from compiler.trace import AdamW, trace, trace_update
from examples import EXAMPLES
from examples.loss import lm_loss
from pipelines.corpus import default_dataset
from pipelines.integrity import verified_dataset
from pipelines.loader import TokenDataset, WindowLoader
from pipelines.manifest import Manifest, token_mismatch_check
from runtime.checkpoint import (
    checkpoints,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    remove_stale,
    save_checkpoint,
    write_text_atomic,
)
from runtime.distributed import Parallel, launched_world
from runtime.program import Program, initial_state
from runtime.run_settings import check_resume, run_settings

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


class TrainingError(MemfitError):
    """Training cannot go on (diverged, or a resume that does not fit the run)."""


@dataclass
class TrainConfig:
    model: str = "gpt2-tiny"
    data: Path | None = None  # a `memfit prepare` directory; None: the embedded corpus
    out: Path = Path("runs/default")
    steps: int = 300
    batch_size: int = 16
    seq_len: int | None = None  # default: the model's block size
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    val_every: int = 100
    val_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    resume: bool = False
    deterministic: bool = False  # bit-identical runs whatever the thread count (one thread)
    device: str = "cpu"
    dp: int | None = None  # data-parallel ranks; None: every launched rank not used by tp
    tp: int = 1  # tensor-parallel ranks
    zero: int = 0  # ZeRO stage over the data-parallel ranks
    bucket_bytes: int = DEFAULT_BUCKET_BYTES  # gradients reduced together across dp ranks
    precision: Precision = Precision.FP32  # master weights and AdamW states stay fp32
    lora: LoraConfig | None = None  # adapters on a frozen base
    quantize_base: str | None = None  # int8 | nf4 frozen base (with lora)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "memfit")

    def check(self) -> None:
        bad = [
            f"--{name.removesuffix('_size').removesuffix('_len').replace('_', '-')} must be"
            f" ≥ {low}, got {getattr(self, name)}"
            for name, low in [
                ("steps", 1),
                ("batch_size", 1),
                ("seq_len", 1),
                ("grad_accum", 1),
                ("warmup", 0),
                ("val_every", 0),
                ("checkpoint_every", 0),
                ("keep_checkpoints", 1),
            ]
            if getattr(self, name) is not None and getattr(self, name) < low
        ]
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad.append(f"--lr must be a positive number, got {self.lr}")
        if bad:
            raise TrainingError("bad training options: " + "; ".join(bad))

    def mesh(self) -> Mesh | None:
        """The mesh to run on; None for one process. Checked against the batch."""
        world = launched_world()
        if self.dp is None and world % max(self.tp, 1):
            raise MeshError(
                f"--tp {self.tp} does not divide the {world} process(es) launched; launch a"
                f" multiple of {self.tp} with torchrun --nproc-per-node"
            )
        dp = max(world // max(self.tp, 1), 1) if self.dp is None else self.dp
        mesh = Mesh(dp, self.tp, self.zero)
        if mesh.world == 1 and world == 1:
            return None
        mesh.check_world(world)  # before the batch: a missing torchrun is the first problem
        mesh.check_batch(self.batch_size)
        if self.grad_accum > 1:
            raise TrainingError("--grad-accum with --dp/--tp is not supported yet")
        return mesh


def make_deterministic() -> None:
    """One intra-op thread and deterministic kernels: every run of the same command computes
    the same bits. A CPU reduction split over N threads sums in an order that depends on N
    (and MKL may change N under load), which moves losses by ~1e-7 from run to run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio · lr` at the last step."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(cfg.warmup, 1)
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    tokens: int
    seconds: float
    val_loss: float | None = None


class Trainer:
    """Compiles the model's step (and a validation forward) and runs them on Arrow batches."""

    def __init__(self, cfg: TrainConfig, progress: Callable[[str], Any] | None = None) -> None:
        cfg.check()
        self.cfg = cfg
        say = progress or (lambda _msg: None)
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            make_deterministic()
        mesh = cfg.mesh()
        self.parallel = Parallel.from_env(mesh, cfg.device) if mesh else None
        if self.is_writer:  # before minutes of compiling: --out must be writable
            _make_run_dir(cfg.out)
        data_dir = cfg.data or default_dataset(cfg.cache_dir)
        self.manifest = Manifest.load(Path(data_dir))
        vocab = int(self.manifest.tokenizer.get("vocab_size", 0))
        example = resolve_model(cfg.model, vocab_size=vocab or None)
        self.seq_len = cfg.seq_len or example.block_size
        self.notices: list[str] = []  # what the run decided that the user must hear
        self.vocab_from_data = cfg.model in EXAMPLES  # a built-in example embeds the data's
        self.vocab_size = example.vocab_size
        if vocab > example.vocab_size:
            raise TrainingError(
                f"the data in {data_dir} has a vocabulary of {vocab} tokens but {cfg.model}"
                f" embeds only {example.vocab_size}"
            )
        train_data = verified_dataset(data_dir, "train", cfg.cache_dir)
        self.loader = WindowLoader(train_data, cfg.batch_size, self.seq_len, seed=cfg.seed)
        window_tokens = cfg.batch_size * self.seq_len
        self.val_dataset = _optional_split(data_dir, "val", window_tokens, cfg.cache_dir)
        optimizer = AdamW(weight_decay=cfg.weight_decay)
        accumulate = cfg.grad_accum > 1
        say(f"tracing {cfg.model} (batch {cfg.batch_size} × {self.seq_len})")
        options = CompileOptions(
            batch_size=cfg.batch_size // (mesh.dp if mesh else 1),
            seq_len=self.seq_len,
            optimizer=None if accumulate else optimizer,
            mesh=mesh,
            rank=self.parallel.rank if self.parallel else 0,
            bucket_bytes=cfg.bucket_bytes,
            precision=cfg.precision,
            lora=cfg.lora,
            quantize_base=cfg.quantize_base,  # type: ignore[arg-type]
        )
        compiled = compile_model(example, lm_loss, options)
        if self.parallel is None:
            self.state = initial_state(compiled.graph, example.module, cfg.device)
            self.train_program = Program(compiled.graph, self.state, cfg.device)
        else:
            assert compiled.context.shard is not None  # a mesh's step is sharded
            self.parallel.bind(compiled.context.shard, example.module)
            self.state = self.parallel.initial_state(compiled.graph, example.module, cfg.device)
            backend = self.parallel.backend
            self.train_program = Program(compiled.graph, self.state, cfg.device, backend)
        self.update_program: Program | None = None
        if accumulate:
            params = dict(example.module.named_parameters())
            update = trace_update({n: p for n, p in params.items() if p.requires_grad}, optimizer)
            for v in update.inputs:
                if v.role.persistent and v.name not in self.state:
                    self.state[v.name] = torch.zeros(v.shape, dtype=v.dtype, device=cfg.device)
            self.update_program = Program(update, self.state, cfg.device)
        self.eval_program: Program | None = None  # traced only if there is validation data
        if self.val_dataset is not None:
            say("tracing the validation forward")
            batch = example_batch(example, cfg.batch_size, self.seq_len)
            loss = parallel_loss(example.module, lm_loss)
            self.eval_program = Program(
                trace(example.module, loss, batch, training=False),
                self.state,
                cfg.device,
                self.train_program.backend,
            )
        self.step = 0
        self.settings = run_settings(cfg, self.seq_len, self.manifest)
        self.checkpoints = cfg.out / CHECKPOINTS
        if self.is_writer and self.checkpoints.is_dir():
            remove_stale(self.checkpoints)
        if cfg.resume:
            self._resume()
        elif done := checkpoints(self.checkpoints):
            raise TrainingError(
                f"{cfg.out} already holds a run (checkpoint {done[-1].name}); pass --resume to"
                " continue it or --out for a new run (nothing was overwritten)"
            )

    # --- one step -------------------------------------------------------------------------

    def train_step(self) -> float:
        self.step += 1
        lr = learning_rate(self.cfg, self.step)
        hyper = self.train_program.hyper(lr, self.optimizer_step)
        if self.update_program is None:
            tokens, targets = next(self.loader)
            if self.parallel is not None:
                tokens, targets = self.parallel.rows(tokens), self.parallel.rows(targets)
            (loss, *_) = self.train_program.run(tokens=tokens, targets=targets, **hyper)
            return self.parallel.mean_loss(loss) if self.parallel else float(loss)
        total = 0.0
        grads: list[Tensor] = []
        for _ in range(self.cfg.grad_accum):
            tokens, targets = next(self.loader)
            loss, *micro = self.train_program.run(tokens=tokens, targets=targets)
            grads = micro if not grads else [g.add_(m) for g, m in zip(grads, micro, strict=True)]
            total += float(loss)
        names = [v.name for v in self.update_program.graph.inputs if v.name.startswith("grad.")]
        feeds = {n: g.div_(self.cfg.grad_accum) for n, g in zip(names, grads, strict=True)}
        self.update_program.run(**feeds, **self.update_program.hyper(lr, self.optimizer_step))
        return total / self.cfg.grad_accum

    @property
    def optimizer_step(self) -> int:
        """AdamW's step for bias correction: an fp16 step that overflowed was skipped."""
        scaler = self.train_program.loss_scaler
        return self.step - (scaler.skipped_steps if scaler else 0)

    def validate(self) -> float | None:
        if self.val_dataset is None or self.eval_program is None:
            return None
        loader = WindowLoader(
            self.val_dataset, self.cfg.batch_size, self.seq_len, seed=0, prefetch=0
        )
        n = min(self.cfg.val_batches, loader.batches_per_epoch)
        losses = [float(self.eval_program.run(tokens=x, targets=y)[0]) for x, y in _take(loader, n)]
        return sum(losses) / len(losses)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> Iterator[StepRecord]:
        """Train to `cfg.steps`, yielding a record per step; checkpoints as configured."""
        cfg = self.cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        # A fresh run replaces the lines of one killed before its first checkpoint.
        mode = "a" if self.step else "w"
        metrics = open(cfg.out / METRICS if self.is_writer else os.devnull, mode)  # noqa: SIM115
        tokens_per_step = cfg.batch_size * self.seq_len * cfg.grad_accum
        try:
            while self.step < cfg.steps:
                start = time.perf_counter()
                loss = self.train_step()
                if not math.isfinite(loss):
                    last = latest_checkpoint(self.checkpoints)
                    kept = f"the last good checkpoint is {last}" if last else "no checkpoint"
                    raise TrainingError(
                        f"the loss is {loss} at step {self.step}; training stopped ({kept}"
                        " was kept). Lower --lr or check the data."
                    )
                record = StepRecord(
                    self.step,
                    loss,
                    learning_rate(cfg, self.step),
                    tokens_per_step,
                    time.perf_counter() - start,
                )
                if cfg.val_every and self.step % cfg.val_every == 0 or self.step == cfg.steps:
                    record.val_loss = self.validate()
                metrics.write(json.dumps(asdict(record)) + "\n")
                metrics.flush()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                yield record
            if not cfg.checkpoint_every or self.step % cfg.checkpoint_every:
                self.save()
        finally:
            metrics.close()
            self.loader.close()

    # --- checkpoints ----------------------------------------------------------------------

    @property
    def is_writer(self) -> bool:
        """Only one process writes checkpoints and metrics."""
        return self.parallel is None or self.parallel.is_writer

    def save(self) -> Path:
        state = {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "tokenizer": self.manifest.tokenizer,
            "config": _jsonable(asdict(self.cfg)),
            "settings": self.settings,
        }
        if self.train_program.loss_scaler is not None:
            state["loss_scaler"] = self.train_program.loss_scaler.state_dict()
        keep = self.cfg.keep_checkpoints
        if self.parallel is None:
            return save_checkpoint(self.checkpoints, self.step, self.state, state, keep)
        full = self.parallel.to_full(self.state)  # every rank takes part; rank 0 writes
        path = self.checkpoints / f"step-{self.step:08d}"
        if self.parallel.is_writer:
            path = save_checkpoint(self.checkpoints, self.step, full, state, keep)
        self.parallel.barrier()
        return path

    def _resume(self) -> None:
        found = find_resumable(self.checkpoints)
        path = found.path
        if found.skipped:
            self.notices.append(found.report())
        tensors, state = load_checkpoint(path)
        token_mismatch_check(self.manifest, state["tokenizer"])
        check_resume(state.get("settings"), self.settings, path)
        if self.parallel is not None:  # the checkpoint is full: take this rank's pieces
            tensors = self.parallel.to_local(tensors, self.state)
        missing = self.state.keys() - tensors.keys()
        if missing:
            raise TrainingError(f"--resume: {path} lacks {sorted(missing)[:5]} for this model")
        for name, t in self.state.items():
            if t.shape != tensors[name].shape:
                raise TrainingError(
                    f"--resume: {path}: {name} has shape {list(tensors[name].shape)}, the model"
                    f" needs {list(t.shape)}"
                )
            t.copy_(tensors[name])
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        if self.train_program.loss_scaler is not None and "loss_scaler" in state:
            self.train_program.loss_scaler.load_state_dict(state["loss_scaler"])
        if self.is_writer:
            _truncate_metrics(self.cfg.out / METRICS, self.step)


def _optional_split(
    directory: Path, split: str, window_tokens: int, cache_dir: Path
) -> TokenDataset | None:
    """The split, if it holds at least one batch of windows; validation is skipped otherwise."""
    info = Manifest.load(Path(directory)).splits.get(split)
    enough = info is not None and info.tokens > window_tokens
    return verified_dataset(Path(directory), split, cache_dir) if enough else None


def _make_run_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise TrainingError(
            f"--out {out}: cannot write the run directory there ({e.strerror}: {e.filename})"
        ) from e


def _take(loader: WindowLoader, n: int) -> Iterator[tuple[Tensor, Tensor]]:
    for _, batch in zip(range(n), loader, strict=False):
        yield batch


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step`: they are recomputed, identically, after a resume."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] > step:
                break
        except ValueError:  # a line a kill tore in half: the last one written
            break
        kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return str(obj) if isinstance(obj, Path) else obj
