"""The training loop: megatron-core MoE models with tensor and expert parallelism, plain torch AdamW, exact resume.

Ranks and gradients: pipeline.train.grads (which rank reads which batch, which grads are summed over which group).

Everything a step does is a function of the step number and the state saved in checkpoints (data order, LR schedule),
so a resumed run repeats the uninterrupted run's loss curve.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.platform import detect_platform, init_distributed, set_threads_per_rank, tune_host_malloc
from pipeline.tokenizer import Tokenizer, tokenizer_for
from pipeline.tracking import Tracker
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.batches import build_batches, unigram_baseline
from pipeline.train.grads import Groups, ParamSets, parallel_groups, scale_aux_loss_grads, sync_and_clip_grads
from pipeline.train.model import build_model, init_model_parallel, model_loss, moe_aux_losses
from pipeline.train.resume import check_checkpoint, load_checkpoint, prepare_run_dir
from pipeline.train.routing import RoutingRecorder


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint and a clean exit at the end of the current step (all ranks agree)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norms (1-D tensors), as usual for transformers.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, device: torch.device, groups: Groups) -> dict[str, float]:
    """Mean token loss and perplexity over the split (every rank runs the same number of batches)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        totals[0] += model_loss(model, batch.to(device)).double().item()
        totals[1] += batch.num_tokens
    model.train()
    moe_aux_losses()  # drop the eval forwards' aux losses from the training tracker
    dist.all_reduce(totals, group=groups.dp)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def _prepare_tokenizer(cfg: RunConfig, is_main: bool) -> Tokenizer:
    # Rank 0 builds the corpus and trains the tokenizer once; the others then read them from the cache.
    if is_main:
        tok = tokenizer_for(cfg)
    dist.barrier()
    return tok if is_main else tokenizer_for(cfg)


def train(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool = False,
    trace_split: str | None = None,
    resume_from: str | None = None,
) -> dict:
    """Train `cfg` (collective: every rank calls it). Returns the final summary (the same on every rank).

    `resume`: continue from the run directory's latest checkpoint; `resume_from`: from that checkpoint (`step_N`, N,
    or a checkpoint path). Without either, `run_dir` must not hold a run (pipeline.train.run_dir)."""
    cfg.parallel.check_trainable(cfg.model, cfg.moe.num_experts)
    if trace_split and cfg.parallel.tp_size > 1:
        # Under sequence parallelism each TP rank routes a slice of every sequence: traces would need re-assembly.
        raise ConfigError(
            "parallel.tp_size", f"routing traces are recorded at tp_size 1 only, got {cfg.parallel.tp_size}"
        )
    platform = detect_platform()
    set_threads_per_rank()
    tune_host_malloc()
    info = init_distributed(platform)
    init_model_parallel(cfg)
    groups = parallel_groups()
    device = platform.device
    latest, run_lock = prepare_run_dir(run_dir, resume, resume_from)
    if latest is not None:
        check_checkpoint(latest, cfg)  # a damaged checkpoint stops every rank before anything is built

    tok = _prepare_tokenizer(cfg, info.is_main)
    train_data = build_batches(cfg, tok, "train", groups.dp_rank, groups.dp_size)
    valid_data = build_batches(cfg, tok, "valid", groups.dp_rank, groups.dp_size).eval_batches()
    model = build_model(cfg, tok.vocab_size)
    optimizer = _optimizer(model, cfg)
    params = ParamSets.of(model)
    scale_aux_loss_grads(groups)

    start = 0
    if resume and latest is None and info.is_main:
        print(f"no checkpoint in {run_dir} to resume from: starting a fresh run")
    if latest is not None:
        start = load_checkpoint(model, optimizer, latest, (cfg.parallel.tp_size, cfg.parallel.ep_size))
        if info.is_main:
            print(f"resuming from {latest} (step {start})")
            if resume_from is not None and latest.parent == run_dir / "checkpoints":
                ckpt_io.point_latest_at(latest)  # a later --resume continues from here, not from the newer ones
    # Only now, with the checkpoint known good on every rank: nothing is written for a run that cannot start.
    tracker = Tracker(cfg, run_dir, "train", is_main=info.is_main, resume_step=start)
    baseline = unigram_baseline(cfg, tok)
    tracker.summary(unigram_baseline_loss=baseline)
    stop = StopFlag()
    recorder = RoutingRecorder(model)
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not info.is_main, unit="step", dynamic_ncols=True)
    last_saved, window_tokens, window_steps, window_start = start, 0, 0, time.perf_counter()
    step, valid = start, None
    while step < cfg.train.steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_data.batch(step).to(device)
        tokens = torch.tensor([float(batch.num_tokens)], device=device)
        dist.all_reduce(tokens, group=groups.dp)
        loss_sum = model_loss(model, batch)
        (loss_sum / tokens).backward()
        grad_norm = sync_and_clip_grads(params, cfg.train.grad_clip, groups)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += int(tokens.item())
        window_steps += 1

        global_loss = loss_sum.detach().reshape(1)
        dist.all_reduce(global_loss, group=groups.dp)
        aux = moe_aux_losses()
        if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {
                "train/loss": global_loss.item() / tokens.item(),
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_per_s": window_tokens / elapsed,
                "train/steps_per_s": window_steps / elapsed,
                **{f"train/{k}": v for k, v in aux.items()},
                **_expert_fractions(recorder),
            }
            tracker.log(metrics, step)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
        bar.update(1)
        if step % cfg.train.eval_interval == 0 or step == cfg.train.steps:
            valid = evaluate(model, valid_data, device, groups)
            recorder.reset()  # the load of evaluation batches is not training load
            tracker.log({"valid/loss": valid["loss"], "valid/ppl": valid["ppl"]}, step)
        stopping = stop.agreed(device)
        if step % cfg.train.save_interval == 0 or step == cfg.train.steps or stopping:
            ckpt_io.save_checkpoint(
                run_dir, step, model, optimizer, cfg, tok, {"tokens_per_step": train_data.tokens_per_step}
            )
            last_saved = step
        if stopping:
            if info.is_main:
                print(f"\nstopped by signal at step {step}: checkpoint saved, resume with --resume")
            break
    bar.close()
    recorder.close()

    summary = {"step": step, "last_checkpoint_step": last_saved, "unigram_baseline_loss": baseline}
    if step == cfg.train.steps and not stop.requested:
        valid = valid or evaluate(model, valid_data, device, groups)  # the loop evaluated at the last step
        summary.update(valid_loss=valid["loss"], valid_ppl=valid["ppl"])
        if cfg.task == "mt":
            from pipeline.train.evaluate_mt import bleu_report

            summary.update(bleu_report(cfg, model, tok, groups.dp_rank, groups.dp_size))
        if trace_split:
            from pipeline.train.traces import record_routing_traces

            summary["traces"] = str(record_routing_traces(cfg, model, tok, trace_split, run_dir, step, groups))
    tracker.summary(**summary)
    tracker.finish()
    if run_lock is not None:
        run_lock.release()
    return summary


def _expert_fractions(recorder: RoutingRecorder) -> dict[str, float]:
    """Per MoE layer, the share of routed tokens each expert got since the last log, over all ranks (collective)."""
    out = {}
    for layer, shares in recorder.fractions().items():
        out.update({f"experts/{layer}/e{e:03d}": s for e, s in enumerate(shares)})
        out[f"experts/{layer}/max_share"] = max(shares)
    recorder.reset()
    return out
