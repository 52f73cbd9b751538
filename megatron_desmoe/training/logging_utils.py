"""Progress lines, TensorBoard events and a JSONL metrics file, written by one rank."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    def __init__(self, config, plan, enabled: bool):
        self.config = config
        self.plan = plan
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        self._window_tokens = 0
        self._window_started = time.perf_counter()
        if not enabled:
            return
        base = Path(config.save) if config.save else None
        tb_dir = config.tensorboard_dir or (base / "tensorboard" if base else None)
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tb_dir))
        metrics_path = config.metrics_file or (base / "metrics.jsonl" if base else None)
        if metrics_path:
            Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(metrics_path, "a")

    def step(self, step, result, phase, kd_weight, moe_losses, domain_losses, *, tokens,
             elapsed, steps_done) -> None:
        self._window_tokens += tokens
        if not self.enabled:
            return
        record = {"step": step + 1, "phase": phase.value, "lr": result.learning_rate,
                  "grad_norm": result.grad_norm, "kd_weight": kd_weight,
                  "skipped_params": result.skipped_params, **result.losses,
                  **{f"loss/{name}": value for name, value in domain_losses.items()},
                  **moe_losses}
        self._write(record)
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and value is not None and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step + 1)
        last = step + 1 == self.config.train_iters
        if (step + 1) % self.config.log_interval and not last:
            return
        window = time.perf_counter() - self._window_started
        tokens_per_s = self._window_tokens / max(window, 1e-9)
        remaining = (self.config.train_iters - step - 1) * elapsed / max(steps_done, 1)
        domains = " ".join(f"{name} {value:.3f}" for name, value in domain_losses.items())
        moe = " ".join(f"{name.replace('_loss', '')} {value:.4f}" for name, value in moe_losses.items())
        print(f"step {step + 1}/{self.config.train_iters} [{phase.value}] "
              f"loss {result.losses.get('lm loss', float('nan')):.4f} | {domains} | {moe} | "
              f"lr {result.learning_rate:.2e} | {tokens_per_s:,.0f} tok/s | "
              f"ETA {_format_eta(remaining)}", flush=True)
        self._window_tokens = 0
        self._window_started = time.perf_counter()

    def validation(self, step: int, losses: dict[str, float], tag: Optional[str] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "validation": losses, **({"tag": tag} if tag else {})}
        self._write(record)
        if self.writer:
            for name, value in losses.items():
                self.writer.add_scalar(f"validation/{name}", value, step)
        label = f" ({tag})" if tag else ""
        print(f"validation{label} at step {step}: " +
              " ".join(f"{name} {value:.4f}" for name, value in losses.items()), flush=True)

    def _write(self, record: dict) -> None:
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self._jsonl:
            self._jsonl.close()
