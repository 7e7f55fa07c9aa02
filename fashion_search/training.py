"""The training loop: AdamW with warmup and cosine decay, autocast, gradient clipping, a wall-time budget,
validation each epoch, checkpoints for --resume and for the best epoch."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from fashion_search import checkpoint, distributed
from fashion_search.config import TrainConfig
from fashion_search.errors import UserError
from fashion_search.inference import embed_images
from fashion_search.metrics import leave_one_out_precision
from fashion_search.data import ImageRows
from fashion_search.runs import Run
from fashion_search.samplers import RankShard, batches
from fashion_search.transforms import augment, augment_draws, normalize


def lr_lambda(total_steps: int, warmup_steps: int, time_progress=None):
    """Linear warmup then cosine decay over the steps; with a time budget, ``time_progress()`` (0..1, the share
    of the budget used) moves the schedule on when time runs out faster than the steps."""
    def cosine(fraction):  # 1 -> 0 as fraction goes 0 -> 1
        return 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))

    def factor(step):
        if time_progress is not None:
            progress, warm = max(step / total_steps, time_progress()), warmup_steps / total_steps
            if progress < warm:
                return max(progress, 1 / total_steps) / warm
            return cosine((progress - warm) / max(1e-9, 1 - warm))
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return cosine((step - warmup_steps) / max(1, total_steps - warmup_steps))
    return factor


class Budget:
    """--time-budget: seconds spent in fit (training and validation, summed over resumed sessions) against the
    budget. Training ends when spent + one more validation reaches it, and the schedule reaches its end then."""

    def __init__(self, minutes: float | None):
        self.seconds = minutes * 60 if minutes else None
        self.spent_before, self.session_start, self.last_val = 0.0, time.perf_counter(), 0.0

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.session_start

    def is_up(self) -> bool:  # leaves time for one more validation
        return self.seconds is not None and self.spent() + self.last_val >= self.seconds

    def progress(self):
        """time_progress for lr_lambda, or None without a budget."""
        if self.seconds is None:
            return None
        return lambda: min(1.0, self.spent() / max(1e-9, self.seconds - self.last_val))


def make_optimizer(model, train: TrainConfig, device):
    """AdamW, without weight decay on biases and norms."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    # fused: one kernel for all tensors, a faster optimizer step (BENCHMARKS.md, section 4)
    return torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=train.lr,
                             fused=device.type in ("cpu", "cuda"))


class LossModule(torch.nn.Module):
    """The model and its loss as one module, so that DistributedDataParallel sees the forward pass however a loss
    calls the model (model(x), model.embed(x), model.head(...))."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, images, labels, rows):
        return self.loss_fn(self.model, images, labels, rows)


class Trainer:
    """One model's optimisation state (model, optimizer, schedule, scaler, step counters), saved to last.pt after
    every epoch and restored from it by --resume."""

    def __init__(self, model, loss_fn, batch_sampler, train: TrainConfig, eval_batch_size: int, runtime,
                 fingerprint: dict):
        """fingerprint: what must match for --resume to continue this run (its config but where it runs)."""
        self.model, self.train, self.runtime = model, train, runtime
        self.eval_batch_size, self.fingerprint = eval_batch_size, fingerprint
        self.loss = distributed.wrap(LossModule(model, loss_fn), runtime.device)  # DDP under torchrun
        self.steps_per_epoch = len(batch_sampler)
        self.total_steps = min(train.epochs * self.steps_per_epoch, train.max_steps or 10**12)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.optimizer = make_optimizer(model, train, runtime.device)
        self.budget = Budget(train.time_budget)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            self.total_steps, int(train.warmup * self.total_steps), self.budget.progress()))
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
        self.start_epoch, self.step, self.best_score, self.best_epoch = 0, 0, -1.0, -1

    def state(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
                "step": self.step, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "fingerprint": self.fingerprint, "seconds_spent": self.budget.spent()}

    def resume(self, run):
        state = checkpoint.load(run.last, map_location=self.runtime.device)
        if state["fingerprint"] != self.fingerprint:
            raise UserError(f"--resume: {run.last} was written with other arguments "
                            f"({state['fingerprint']}); rerun with those, or without --resume")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.step = state["epoch"] + 1, state["step"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.budget.spent_before = state.get("seconds_spent", 0.0)
        if distributed.world().main:
            run.trim_log(self.start_epoch)  # lines of an epoch that was cut short are written again
            print(f"resumed from {run.last} after epoch {state['epoch'] + 1}, step {self.step}")

    def train_step(self, images, labels, rows) -> float:
        model = self.model
        with self.runtime.autocast():
            loss = self.loss(images, labels, rows)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return loss.item()

    def train_epoch(self, loader, epoch: int) -> dict:
        """One pass over the loader (cut short by --max-steps or the budget): loss, throughput and data wait."""
        self.loss.train()
        loader.batch_sampler.set_epoch(epoch)
        rows = loader.dataset.rows  # each row's draw, by its place in the split (rows left out keep theirs unused)
        draws = augment_draws(int(rows.max()) + 1 if len(rows) else 0,
                              torch.Generator().manual_seed(self.train.seed * 100_003 + epoch))
        started, data_wait, loss_sum, seen, out_of_time = time.perf_counter(), 0.0, 0.0, 0, False
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch", leave=False,
                   disable=None if distributed.world().main else True)
        fetch_started = time.perf_counter()
        for images, labels, rows in bar:
            if self.step >= self.total_steps:
                break
            if self.budget.seconds is not None and distributed.broadcast(self.budget.is_up()):  # ranks agree
                out_of_time = True
                break
            images = augment(normalize(images, self.model.mean, self.model.std, self.runtime.device,
                                       self.model.channels_last), draws[rows])
            labels = labels.to(self.runtime.device, non_blocking=True)
            data_wait += time.perf_counter() - fetch_started
            loss = self.train_step(images, labels, rows)
            loss_sum += loss * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            fetch_started = time.perf_counter()
        seconds = time.perf_counter() - started
        loss_sum, seen = distributed.total(loss_sum, seen)  # over the global batches
        return {"train_loss": loss_sum / max(1, seen), "seconds": seconds, "seen": int(seen), "data_wait": data_wait,
                "out_of_time": out_of_time}

    def validate(self, val_rows) -> float:
        """precision@5 leave-one-out within val (model selection), computed by rank 0; its duration counts for the
        budget."""
        started = time.perf_counter()
        score = None
        if distributed.world().main:
            embeddings = embed_images(self.model, val_rows.images, self.runtime.device, self.runtime.dtype,
                                      self.eval_batch_size, "val")
            score = leave_one_out_precision(embeddings, val_rows.labels, k=5)
        score = distributed.broadcast(score)
        self.budget.last_val = time.perf_counter() - started
        return score


def fit(model, loss_fn, train_rows: ImageRows, val_rows: ImageRows, batch_sampler, run: Run, train: TrainConfig,
        eval_batch_size: int, runtime, save_extra: dict, fingerprint: dict):
    """AdamW + warmup/cosine, grad clipping, autocast; each epoch: a tqdm bar, validation precision@5
    (leave-one-out within val), one summary line, last.pt for --resume and best.pt when val improves. Returns the
    best epoch's checkpoint, whose weights the model then holds. Under torchrun every rank trains on its shard of
    each batch and rank 0 alone writes."""
    main = distributed.world().main
    model.to(runtime.device)
    if model.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = batches(train_rows, RankShard(batch_sampler))
    trainer = Trainer(model, loss_fn, batch_sampler, train, eval_batch_size, runtime, fingerprint)
    if train.resume and run.last.exists():
        trainer.resume(run)
    for epoch in range(trainer.start_epoch, trainer.epochs):
        stats = trainer.train_epoch(loader, epoch)
        score = trainer.validate(val_rows)
        improved = score > trainer.best_score
        if improved:
            trainer.best_score, trainer.best_epoch = score, epoch
            if main:
                checkpoint.save(run.best, {"model": model.state_dict(), "epoch": epoch, "val_precision@5": score,
                                           **save_extra})
        seconds = max(stats["seconds"], 1e-9)
        record = {"epoch": epoch + 1, "step": trainer.step, "train_loss": stats["train_loss"],
                  "val_precision@5": score, "lr": trainer.scheduler.get_last_lr()[0], "seconds": round(seconds, 2),
                  "images_per_second": round(stats["seen"] / seconds, 1),
                  "data_wait_share": round(stats["data_wait"] / seconds, 4)}
        if main:
            run.log(record)
            checkpoint.save(run.last, trainer.state(epoch))
            print(f"epoch {epoch + 1}/{trainer.epochs} loss {record['train_loss']:.4f} val_precision@5 {score:.4f}"
                  f"{' *' if improved else ''} {record['images_per_second']:.0f} img/s "
                  f"data-wait {record['data_wait_share']:.1%}", flush=True)
        if trainer.step >= trainer.total_steps:
            break
        if stats["out_of_time"] or (train.time_budget and distributed.broadcast(trainer.budget.is_up())):
            if main:
                print(f"time budget of {train.time_budget:g} min reached after {trainer.step} steps (epoch {epoch + 1})")
            break
    if not distributed.replicas_identical(model):
        raise RuntimeError("data-parallel replicas diverged: their weights differ after training")
    distributed.barrier()  # best.pt is written
    if not run.best.exists():
        raise UserError(f"no epoch finished in {run.dir}; nothing to export")
    state = checkpoint.load(run.best, map_location=runtime.device)
    model.load_state_dict(state["model"])
    return state
