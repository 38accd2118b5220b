"""The one training loop of every stage (ConText-CIR and TMCIR training, TMCIR's alignment, the
towers' pretraining, the Combiner), with its schedule, optimizer, data order and log.

    schedule = Schedule(lr=3e-4, min_lr=3e-6, warmup=200, steps=3000)
    opt = make_optimizer(model, lr=schedule.lr, weight_decay=1e-2)
    step = run_loop(batches, loss_of, opt, LoopConfig(schedule, stop=3000, clip_grad=1.0, log=run / "log.jsonl"))

`loss_of(batch)` returns (loss, {name: float} of its parts to log); each step sets the learning
rate, runs it, clips the gradient norm, steps the optimizer and appends a line to the log:
{"step", "lr", "loss", **parts, "grad_norm", "sec" (the step), "data_sec" (waiting for its batch)}.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up to `lr` over `warmup` steps, then cosine annealing to `min_lr` at step `steps`;
    the schedule begins at step `start` (0, or a warm start's step when its schedule restarts).
    `rewarm_at`: a run continued at that step with fresh optimizer moments; its lr ramps linearly
    onto the same schedule over the next `warmup` steps."""

    lr: float
    min_lr: float
    warmup: int
    steps: int
    start: int = 0
    rewarm_at: int | None = None

    def at(self, step: int) -> float:
        ramp = 1.0 if self.rewarm_at is None else min(1.0, (step - self.rewarm_at + 1) / max(1, self.warmup))
        step, steps = step - self.start, self.steps - self.start
        if step < self.warmup:
            return ramp * self.lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, steps - self.warmup))
        return ramp * (self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t)))


@dataclass(frozen=True)
class OptimConfig:
    """A run's optimizer and schedule: AdamW at the schedule's peak lr with `weight_decay`
    (`make_optimizer`), the lr `schedule`, gradient-norm clipping at `clip_grad`."""

    schedule: Schedule
    weight_decay: float
    clip_grad: float

    @staticmethod
    def from_args(a) -> "OptimConfig":
        """From the flags `cir.cli.add_training_flags` (and cir.train) define."""
        schedule = Schedule(a.lr, a.min_lr, a.warmup, a.steps, getattr(a, "schedule_start", 0),
                            getattr(a, "rewarm_at", None))
        return OptimConfig(schedule, a.weight_decay, a.clip_grad)


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.98) over the trainable parameters, weight decay on weight matrices only (not on
    biases, norms, the token embedding)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decays = lambda n, p: p.ndim >= 2 and "token_embedding" not in n
    return torch.optim.AdamW([{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
                              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, manifest: dict) -> None:
    """Load the optimizer state a checkpoint holds (`optimizer.{index}.{name}` tensors and the
    manifest's "optimizer_param_groups", as cir.checkpoint.save_checkpoint writes them)."""
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": manifest["optimizer_param_groups"]})


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s data order (and draws) in a run of seed `seed`."""
    return seed * 100003 + epoch


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch `epoch`'s order of n items, cut to whole batches: [n // batch_size * batch_size]."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    return order[: n // batch_size * batch_size]


def truncate_log(path: Path, step: int) -> None:
    """Keep only log lines up to `step` (a resumed run rewrites what came after its checkpoint; 0: a
    fresh run starts an empty log); a line cut short by a crash is dropped."""
    if not path.exists():
        return

    def step_of(line: str) -> int | None:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return None

    keep = [line for line in path.read_text(errors="replace").splitlines()
            if line and (s := step_of(line)) is not None and s <= step]
    path.write_text("".join(line + "\n" for line in keep))


def loss_text(value: float) -> str:
    """A loss as the progress bar shows it: 4 significant digits, so a CC term of 8e-4 never reads 0.000."""
    return f"{value:.4g}"


@dataclass(frozen=True)
class LoopConfig:
    """What `run_loop` does: steps up to `stop` on `schedule`, gradient-norm clipping at `clip_grad`
    (0 = off), the log file `log` (None: none) and progress bar `desc`; `main` is False on the
    processes of a multi-GPU run that neither log nor call `on_step`."""

    schedule: Schedule
    stop: int
    clip_grad: float
    log: Path | None
    desc: str = "train"
    main: bool = True


def run_loop(batches: Iterable, loss_of: Callable, opt: torch.optim.Optimizer, cfg: LoopConfig, start: int = 0,
             clipped: list[torch.Tensor] | None = None, after_step: Callable[[], None] | None = None,
             on_step: Callable[[int, dict], None] | None = None) -> int:
    """Steps start + 1 .. cfg.stop over `batches` (an iterator that yields the batches of those steps
    in order). `clipped`: the parameters whose gradient norm is clipped (default: the optimizer's);
    `after_step()` runs after every optimizer step (e.g. a temperature clamp); `on_step(step, record)`
    after each logged step (validation, checkpoints). Returns the last step run."""
    clipped = clipped if clipped is not None else [p for g in opt.param_groups for p in g["params"]]
    if cfg.main and cfg.log is not None:
        cfg.log.parent.mkdir(parents=True, exist_ok=True)
        truncate_log(cfg.log, start)
    step = start
    bar = tqdm(total=cfg.stop, initial=start, desc=cfg.desc, unit="step", disable=not cfg.main)
    waited = time.perf_counter()
    for batch in batches if step < cfg.stop else ():
        t0 = time.perf_counter()
        lr = cfg.schedule.at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, parts = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(clipped, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        opt.step()
        if after_step is not None:
            after_step()
        step += 1
        if cfg.main:
            value = loss.item()
            record = {"step": step, "lr": lr, "loss": value, **parts, "grad_norm": float(gnorm),
                      "sec": time.perf_counter() - t0, "data_sec": t0 - waited}
            if cfg.log is not None:
                with open(cfg.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=loss_text(value), **{k: loss_text(v) for k, v in parts.items()}, lr=f"{lr:.1e}")
            bar.update()
            if on_step is not None:
                on_step(step, record)
        if step >= cfg.stop:
            break
        waited = time.perf_counter()
    bar.close()
    return step


def fit(module: torch.nn.Module, batches: Iterable, loss_of: Callable, optim: OptimConfig, log: Path, desc: str,
        after_step: Callable[[], None] | None = None) -> float:
    """optim.schedule.steps steps of `run_loop` from scratch on `module`'s trainable parameters (the short
    stages that need no --resume: the Combiner), then `module.eval()`.
    Returns the last loss."""
    opt = make_optimizer(module, optim.schedule.lr, optim.weight_decay)
    module.train()
    last: dict = {}
    run_loop(batches, loss_of, opt, LoopConfig(optim.schedule, optim.schedule.steps, optim.clip_grad, log, desc),
             after_step=after_step, on_step=lambda step, record: last.update(record))
    module.eval()
    return last["loss"]
