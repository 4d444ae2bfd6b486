"""The training loop: compiled step, Arrow batches, LR schedule, validation, exact resume.

Everything that decides the next step's numbers — parameters, AdamW moments, the step count
and the loader's position — is in the checkpoint, so a run killed at any instant and resumed
with `resume=True` logs the same loss at every step as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compiler.budget import Budget, compile_within
from compiler.compile import (
    CompiledStep,
    CompileOptions,
    TracedStep,
    example_batch,
    optimize,
    trace_model,
)
from compiler.ir import Role
from compiler.mesh import Mesh
from compiler.models import resolve_model
from compiler.passes.manager import PassContext
from compiler.passes.recompute import RecomputePolicy
from compiler.passes.shard import parallel_loss
from compiler.trace import AdamW, trace
from examples import EXAMPLES, ExampleModel
from examples.loss import lm_loss
from pipelines.corpus import default_dataset
from pipelines.integrity import verified_dataset
from pipelines.loader import TokenDataset, WindowLoader
from pipelines.manifest import Manifest, token_mismatch_check
from runtime.arena import allocations
from runtime.backend import backend_for, fusion_of, resolve_backend
from runtime.checkpoint import (
    CheckpointError,
    checkpoints,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    load_state,
    remove_stale,
    save_checkpoint,
    write_text_atomic,
)
from runtime.distributed import Parallel
from runtime.fit import check_fit, check_host_fit, device_capacity, host_available
from runtime.program import Program, initial_state
from runtime.run_settings import check_resume, run_settings
from runtime.train_config import TrainConfig, TrainingError

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


def mask_documents(module: torch.nn.Module, manifest: Manifest, model: str) -> None:
    """--document-mask: the model attends within each document the data packs (and restarts
    positions at each), split at the tokenizer's EOS."""
    if not hasattr(module, "document_eos"):
        raise TrainingError(
            f"--document-mask: {model} has no `document_eos` attribute; the built-in gpt2 and"
            " llama examples mask packed documents, a model file must handle it itself"
        )
    eos = manifest.tokenizer.get("eos_id")
    if eos is None:
        raise TrainingError("--document-mask: the prepared data's tokenizer names no eos_id")
    module.document_eos = int(eos)


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
    tokens_per_s: float
    peak_bytes: int | None  # measured so far (CUDA: every step; CPU: the first two steps)
    val_loss: float | None = None


class Trainer:
    """Compiles the model's step (and a validation forward), checks that its plan fits the
    device, and runs them on the chosen backend on Arrow batches."""

    def __init__(self, cfg: TrainConfig, progress: Callable[[str], Any] | None = None) -> None:
        cfg.check()
        self.cfg = cfg
        say = progress or (lambda _msg: None)
        self.backend = resolve_backend(cfg.backend, cfg.device)
        budget = Budget.parse(cfg.memory_budget) if cfg.memory_budget else None
        capacity = device_capacity(cfg.device_memory, cfg.device)
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            make_deterministic()
        self.mesh = mesh = cfg.mesh()
        if mesh is not None and self.backend != "eager":  # collectives run async, unplanned
            if cfg.backend != "auto":
                raise TrainingError(
                    f"--backend {cfg.backend} with --dp/--tp is not supported yet: the arena"
                    " does not run collectives; use --backend eager (or auto) on a mesh"
                )
            self.backend = "eager"
        self.parallel = Parallel.from_env(mesh, cfg.device) if mesh else None
        if self.is_writer:  # before minutes of compiling: --out must be writable
            _check_writable(cfg.out)
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
        if cfg.document_mask:
            mask_documents(example.module, self.manifest, cfg.model)
        window_tokens = cfg.batch_size * self.seq_len
        self.val_dataset = _optional_split(data_dir, "val", window_tokens, cfg.cache_dir)
        self.settings = run_settings(cfg, self.seq_len, self.manifest)
        self.checkpoints = cfg.out / CHECKPOINTS
        self.resume_from = self._resumable()  # refused before anything is compiled
        say(f"tracing {cfg.model} (batch {cfg.batch_size} × {self.seq_len})")
        options = self.compile_options(mesh)
        self.compiled = compile_within(
            trace_model(example, lm_loss, options), options, budget, _layers(example)
        )
        self.compiled_eval = self._compile_eval(example, options) if self.val_dataset else None
        if self.compiled.plan is not None and torch.device(cfg.device).type == "cuda":
            check_host_fit(self.compiled, host_available())  # on CPU, host is the device
        if capacity is not None:
            say("checking that the plan fits")
            check_fit(
                self.compiled,
                self.planned_peak,
                capacity,
                cfg.batch_size,
                cfg.grad_accum,
                budget,
                self._replan,
            )
        self.example, self.data_dir = example, data_dir
        self._start()

    def _start(self) -> None:
        """Everything that runs: the loader, the state on the device, the programs; resumed."""
        cfg = self.cfg
        train_data = verified_dataset(self.data_dir, "train", cfg.cache_dir)
        self.loader = WindowLoader(train_data, cfg.batch_size, self.seq_len, seed=cfg.seed)
        self._build_programs(self.example)
        self.step = 0
        self.measured_peak: int | None = None
        self._profiled = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)

    def with_backend(self, name: str, out: Path) -> Trainer:
        """A new run of the same compiled steps from the same initial weights on another
        backend, into `out`: one compilation serves a comparison of runtimes."""
        backend = resolve_backend(name, self.cfg.device)
        if fusion_of(backend) != fusion_of(self.backend) or self.parallel is not None:
            raise TrainingError(f"the {name} backend needs its own compilation: a new Trainer")
        other = copy.copy(self)
        other.cfg = replace(self.cfg, backend=name, out=out, resume=False)
        other.checkpoints = out / CHECKPOINTS
        other.resume_from = other._resumable()  # a fresh run: refused if `out` holds one
        other.backend = backend
        other._start()
        return other

    def compile_options(
        self, mesh: Mesh | None, batch_size: int | None = None, grad_accum: int | None = None
    ) -> CompileOptions:
        """What the step is compiled with (a global batch and grad_accum other than the run's:
        what the fit check tries instead)."""
        cfg = self.cfg
        return CompileOptions(
            batch_size=(batch_size or cfg.batch_size) // (mesh.dp if mesh else 1),
            seq_len=self.seq_len,
            optimizer=AdamW.named(cfg.optimizer, cfg.weight_decay),
            grad_accum=grad_accum or cfg.grad_accum,
            mesh=mesh,
            rank=self.parallel.rank if self.parallel else 0,
            bucket_bytes=cfg.bucket_bytes,
            precision=cfg.precision,
            lora=cfg.lora,
            quantize_base=cfg.quantize_base,  # type: ignore[arg-type]
            offload_optimizer=cfg.offload_optimizer,
            recompute=RecomputePolicy() if cfg.recompute else None,
            backend=fusion_of(self.backend),
        )

    def _replan(self, budget: Budget | None, **changes: Any) -> CompiledStep:
        """The step planned again on a meta-device model with other options (the fit check)."""
        example = resolve_model(self.cfg.model, device="meta", vocab_size=self.vocab_size)
        if self.cfg.document_mask:
            mask_documents(example.module, self.manifest, self.cfg.model)
        options = self.compile_options(self.mesh, **changes)
        traced = trace_model(example, lm_loss, options)
        return compile_within(traced, options, budget, _layers(example))

    def _compile_eval(self, example: ExampleModel, options: CompileOptions) -> CompiledStep:
        """The validation forward through the same passes, so it runs on the same backend."""
        batch = example_batch(example, options.batch_size, self.seq_len)
        loss = parallel_loss(example.module, lm_loss)
        graph = trace(example.module, loss, batch, training=False)
        if options.mesh is not None:  # collectives of the tensor-parallel forward: unplanned
            return CompiledStep(graph, PassContext(), options.batch_size, self.seq_len)
        eval_options = replace(options, grad_accum=1)
        return optimize(TracedStep(graph, self.seq_len, None), eval_options)

    def _build_programs(self, example: ExampleModel) -> None:
        """State on the device, then one program per graph, all over one shared arena."""
        cfg, compiled = self.cfg, self.compiled
        steps = self._planned_steps()
        if self.parallel is None:
            self.state = initial_state(compiled.graph, example.module, cfg.device)
        else:
            assert compiled.layout is not None
            self.parallel.bind(compiled.layout, example.module)
            self.state = self.parallel.initial_state(compiled.graph, example.module, cfg.device)
        planned = [s.plan.arena_bytes for s in steps if s.plan is not None]
        self.arena = None
        if self.backend != "eager" and planned:
            self.arena = torch.empty(max(planned), dtype=torch.uint8, device=cfg.device)

        def program(step: CompiledStep) -> Program:
            name = self.backend if step.plan is not None else "eager"
            backend = backend_for(step, name, cfg.device, self.arena)
            if self.parallel is not None:
                backend = self.parallel.wrap(backend)
            return Program(step.graph, self.state, cfg.device, backend)

        self.train_program = program(compiled)
        self.micro_program = program(compiled.micro) if compiled.micro else None
        if self.micro_program is not None:  # one loss scale over the micro-steps
            self.micro_program.loss_scaler = self.train_program.loss_scaler
        self.eval_program = program(self.compiled_eval) if self.compiled_eval else None

    # --- one step -------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step: the micro-steps add their gradients into the planned sums,
        the last one applies the update (all inside the compiled graphs)."""
        self.step += 1
        lr = learning_rate(self.cfg, self.step)
        total = 0.0
        for micro in range(self.cfg.grad_accum):
            last = micro == self.cfg.grad_accum - 1
            program = self.train_program if last else self.micro_program
            assert program is not None
            hyper = program.hyper(lr, self.optimizer_step)
            tokens, targets = next(self.loader)
            if self.parallel is not None:
                tokens, targets = self.parallel.rows(tokens), self.parallel.rows(targets)
            (loss, *_) = program.run(tokens=tokens, targets=targets, **hyper)
            total += self.parallel.mean_loss(loss) if self.parallel else float(loss)
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
        losses = []
        for tokens, targets in _take(loader, n):
            if self.parallel is None:
                losses.append(float(self.eval_program.run(tokens=tokens, targets=targets)[0]))
                continue
            # compiled for this rank's rows, like the training step
            rows = {"tokens": self.parallel.rows(tokens), "targets": self.parallel.rows(targets)}
            losses.append(self.parallel.mean_loss(self.eval_program.run(**rows)[0]))
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
                loss = self._measured_step()
                seconds = time.perf_counter() - start
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the loss is {loss} at step {self.step}; training stopped"
                        f" ({self._kept()}). Lower --lr or check the data."
                    )
                record = StepRecord(
                    self.step,
                    loss,
                    learning_rate(cfg, self.step),
                    tokens_per_step,
                    seconds,
                    tokens_per_step / max(seconds, 1e-9),
                    self.measured_peak,
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

    # --- memory -------------------------------------------------------------------------

    @property
    def planned_peak(self) -> int:
        """The plan's peak of one optimizer step; programs share the largest arena, so a
        validation forward's larger arena counts too. On a CPU device the host memory of
        offloaded optimizer states is the same memory, and counts."""
        if self.compiled.plan is None:
            return 0
        arenas = [s.plan.arena_bytes for s in self._planned_steps() if s.plan is not None]
        train = [s.plan.arena_bytes for s in (self.compiled, self.compiled.micro) if s and s.plan]
        host = self.compiled.plan.host_bytes if torch.device(self.cfg.device).type == "cpu" else 0
        return self.compiled.peak_bytes + max(arenas) - max(train) + host

    def _planned_steps(self) -> list[CompiledStep]:
        """The train step, its micro-step, the validation forward: the ones that exist."""
        steps = (self.compiled, self.compiled.micro, self.compiled_eval)
        return [s for s in steps if s is not None]

    def _measured_step(self) -> float:
        """One step; the device's peak bytes recorded (on CPU, for the first two steps, from
        the allocator's events above what is held before the step: state and arena)."""
        device = torch.device(self.cfg.device)
        try:
            if device.type == "cuda":
                loss = self.train_step()
                self.measured_peak = torch.cuda.max_memory_allocated(device)
                return loss
            if self._profiled >= 2:
                return self.train_step()
            self._profiled += 1
            held = sum(t.nbytes for t in self.state.values())
            held += self.arena.nbytes if self.arena is not None else 0
            result: list[float] = []
            with _quiet_stderr():  # the profiler logs its start and stop there
                during = allocations(lambda: result.append(self.train_step())).peak_bytes
            self.measured_peak = max(self.measured_peak or 0, held + during)
            return result[0]
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"{device} ran out of memory at step {self.step} ({self._kept()}); the plan"
                f" peaks at {self.planned_peak:,} bytes: lower --memory-budget, --batch or"
                " raise --grad-accum, or free the device"
            ) from None

    def _kept(self) -> str:
        last = latest_checkpoint(self.checkpoints)
        return f"the last good checkpoint is {last}, kept" if last else "no checkpoint yet"

    # --- checkpoints ----------------------------------------------------------------------

    @property
    def checkpointed(self) -> dict[str, Tensor]:
        """The state a checkpoint holds: gradient sums are zero between steps, so a run may
        resume with another --grad-accum."""
        roles = self.compiled.io.state
        return {k: t for k, t in self.state.items() if roles.get(k) is not Role.GRAD_ACCUM}

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
            return save_checkpoint(self.checkpoints, self.step, self.checkpointed, state, keep)
        full = self.parallel.to_full(self.state)  # every rank takes part; rank 0 writes
        path = self.checkpoints / f"step-{self.step:08d}"
        failure: CheckpointError | None = None
        if self.parallel.is_writer:
            try:
                path = save_checkpoint(self.checkpoints, self.step, full, state, keep)
            except CheckpointError as e:
                failure = e
        # every rank stops together: one left waiting in the next step's collective would hang
        if self.parallel.any_rank(failure is not None):
            raise failure or CheckpointError(f"rank 0 could not write {path}; see its error")
        return path

    def _resumable(self) -> Path | None:
        """The checkpoint `--resume` starts from, checked against this run before anything is
        compiled; None for a fresh run, refused if `--out` already holds one."""
        if self.is_writer and self.checkpoints.is_dir():
            remove_stale(self.checkpoints)
        if not self.cfg.resume:
            if done := checkpoints(self.checkpoints):
                raise TrainingError(
                    f"{self.cfg.out} already holds a run (checkpoint {done[-1].name}); pass"
                    " --resume to continue it or --out for a new run (nothing was overwritten)"
                )
            return None
        found = find_resumable(self.checkpoints)
        if found.skipped:
            self.notices.append(found.report())
        state = load_state(found.path)
        token_mismatch_check(self.manifest, state["tokenizer"])
        check_resume(state.get("settings"), self.settings, found.path)
        return found.path

    def _resume(self, path: Path) -> None:
        tensors, state = load_checkpoint(path)
        if self.parallel is not None:  # the checkpoint is full: take this rank's pieces
            tensors = self.parallel.to_local(tensors, self.state)
        missing = self.checkpointed.keys() - tensors.keys()
        if missing:
            raise TrainingError(f"--resume: {path} lacks {sorted(missing)[:5]} for this model")
        for name, t in self.checkpointed.items():
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


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C++ libraries write there, past sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _layers(example: ExampleModel) -> int:
    """Transformer blocks: per-layer checkpointing is one of the budget searches."""
    return len(getattr(example.module, "blocks", [1]))


def _optional_split(
    directory: Path, split: str, window_tokens: int, cache_dir: Path
) -> TokenDataset | None:
    """The split, if it holds at least one batch of windows; validation is skipped otherwise."""
    info = Manifest.load(Path(directory)).splits.get(split)
    enough = info is not None and info.tokens > window_tokens
    return verified_dataset(Path(directory), split, cache_dir) if enough else None


def _check_writable(out: Path) -> None:
    """Fail early if the run directory cannot be written, leaving nothing behind: a run
    stopped by bad input (a plan that does not fit...) writes nothing to --out."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise TrainingError(
            f"--out {out}: cannot write the run directory there ({e.strerror}: {e.filename})"
        ) from e
    finally:
        for directory in made:  # deepest first
            if directory.is_dir():
                directory.rmdir()


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
