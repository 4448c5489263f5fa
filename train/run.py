"""Train MICON or a baseline with DeepSpeed, one process per device.

    ./launch.sh train CONFIG.yaml [key=value ...]          (CONFIG may be "-" for defaults)
    torchrun --nproc-per-node 2 -m train.run CONFIG ...    (what launch.sh does with nproc=N)
    srun python -m train.run CONFIG ...                    (cluster/templates/train.sbatch)

Exit codes: 0 finished; 75 checkpointed on SIGTERM/SIGUSR1 (requeue and rerun to resume);
1 stopped on a non-finite loss or bad input; 2 bad configuration.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

EXIT_REQUEUE = 75
log = logging.getLogger("micon.train")


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    samples_seen: int = 0
    data_seed: int = 0
    data_position: int = 0           # batches consumed by this rank's loader
    data_workers: int = 0
    world_size: int = 1
    skipped_nonfinite: int = 0


class SignalFlag:
    """SIGTERM / SIGUSR1 (Slurm's warning before the time limit or preemption) ask for a checkpoint."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def ds_config(cfg, world_size: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.engine.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.engine.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up then cosine decay to min_ratio of the base rate (a picklable closure target)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        t = min(1.0, (step - warmup) / max(total - warmup, 1))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def compound_labels(manifest) -> dict[str, int]:
    ids = sorted(c["Metadata_JCP2022"] for c in manifest.data["compounds"])
    return {c: i for i, c in enumerate(ids)}


def check_graphs(manifest, store_dir: str) -> None:
    """Refuse to start when a training compound has no graph, naming them and the reason."""
    from micon import schema
    from micon.chem.store import GraphStore

    store = GraphStore(store_dir)
    missing = []
    for c in manifest.data["compounds"]:
        if c["Metadata_Role"] in (schema.TREATED, schema.POSCON) and c[schema.JCP] not in manifest.data["splits"][
                "heldout_compounds"] and c[schema.JCP] not in store:
            reason = "not featurised"
            if c[schema.JCP] in set(store.index[schema.JCP]):
                reason = store.index.set_index(schema.JCP).loc[c[schema.JCP], "reason"]
            missing.append(f"{c[schema.JCP]} ({reason})")
    if missing:
        raise SystemExit(f"train: {len(missing)} training compound(s) have no graph in {store_dir}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Fix their structures "
                         f"and rerun ./launch.sh featurize, or drop them from the screen.")


def forward_loss(method: str, model, batch: dict, cfg, device, dtype) -> dict:
    import torch

    from micon import losses
    from micon.models.molecule import graphs_to_torch

    views = batch["views"].to(device, dtype, non_blocking=True)
    labels = batch["labels"].to(device)
    if method == "simclr":
        out = model(views)
        return {"loss": losses.simclr_loss(out["view1"], out["view2"], cfg.loss.temperature)}
    graphs = None
    if "graphs" in batch:
        graphs = graphs_to_torch(batch["graphs"], device)
        graphs.atom_features = graphs.atom_features.to(dtype)
        graphs.bond_features = graphs.bond_features.to(dtype)
    if method == "clip":
        out = model(views, graphs)
        return {"loss": losses.clip_loss(out["image"], out["molecule"], out["logit_scale"])}
    controls = batch["controls"].to(device, dtype, non_blocking=True)
    if method == "paclr":
        net = model.module if hasattr(model, "module") else model
        h_t, h_c = net._embed_views(views, controls)
        z_t, z_c = net.projector(h_t), net.projector(h_c)
        return {"loss": losses.paclr_loss(z_t, z_c, labels, cfg.loss.temperature,
                                          dmso_positives=cfg.loss.dmso_positives, labels_are_global=True)}
    out = model(views, controls, graphs, labels)
    parts = losses.micon_loss(out, temperature=cfg.loss.temperature,
                              counterfactual_weight=cfg.loss.counterfactual_weight,
                              dmso_positives=cfg.loss.dmso_positives, counterfactual_mode=cfg.loss.counterfactual_mode,
                              labels_are_global=True)
    return {k: v for k, v in parts.items() if isinstance(v, torch.Tensor)}


def memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from micon.config import ConfigError, describe, load_config, save_config, to_dict
    from train.config import TrainConfig

    try:
        cfg = load_config(TrainConfig, None if argv[0] == "-" else argv[0], argv[1:])
    except ConfigError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    flag = SignalFlag()

    import torch
    import torch.distributed as dist

    from micon.data.pipeline import ExampleStream, StreamConfig, collate_identity, ignore_stop_signals
    from micon.data.shards import Manifest, ManifestError
    from micon.models.factory import build_model
    from train import checkpoint, distributed

    info = distributed.init(cfg.engine.dist_timeout_s)
    rank, world = info.rank, info.world_size
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    bf16 = cfg.engine.precision == "bf16" or (cfg.engine.precision == "auto" and device.type == "cuda"
                                              and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        manifest = Manifest.load(cfg.data.shards)
        if cfg.method in ("micon", "clip") and rank == 0:
            check_graphs(manifest, cfg.data.graphs)
    except (ManifestError, SystemExit) as e:
        print(str(e) if str(e).startswith("train:") else f"train: {e}", file=sys.stderr)
        distributed.shutdown() if world == 1 else None
        return 1
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log.info("training %s on %d process(es) via %s, %s, %s; config %s", cfg.method, world, info.launcher,
                 device, "bf16" if bf16 else "fp32", describe(cfg))

    torch.manual_seed(cfg.seed)
    atom_dim = bond_dim = 0
    if cfg.method in ("micon", "clip"):
        from micon.chem.featurizer import ATOM_DIM, BOND_DIM
        atom_dim, bond_dim = ATOM_DIM, BOND_DIM
    model = build_model(cfg.method, cfg.model, len(manifest.channels), atom_dim, bond_dim)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio))

    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, world, bf16),
        dist_init_required=False)

    state = TrainState(data_seed=cfg.seed, data_workers=cfg.data.num_workers, world_size=world)
    tag = checkpoint.resolve_resume(ckpt_root, cfg.resume, rank)
    if tag is not None:
        _, client = engine.load_checkpoint(str(ckpt_root), tag=tag)
        state = TrainState(**{k: v for k, v in client.items() if k in TrainState.__dataclass_fields__})
        if state.data_workers != cfg.data.num_workers or state.world_size != world:
            log.warning("resuming with %d workers x %d ranks (saved with %d x %d): the data stream continues "
                        "from a new order, not exactly where it stopped", cfg.data.num_workers, world,
                        state.data_workers, state.world_size)
            state.data_position, state.data_workers, state.world_size = 0, cfg.data.num_workers, world
            state.data_seed = cfg.seed + state.step
        log.info("resumed from %s at step %d (%d samples seen)", ckpt_root / tag, state.step, state.samples_seen)

    stream_cfg = StreamConfig(method=cfg.method, batch_size=cfg.micro_batch, shuffle_buffer=cfg.data.shuffle_buffer,
                              pair_buffer=cfg.data.pair_buffer, pair_prefer=cfg.data.pair_prefer,
                              resample=cfg.data.resample, normalize=cfg.data.normalize,
                              include_poscon=cfg.data.include_poscon, seed=state.data_seed, augment=cfg.data.augment)
    dataset = ExampleStream(cfg.data.shards, stream_cfg, rank, world, cfg.data.num_workers,
                            cfg.data.graphs or None, skip_batches=state.data_position,
                            compound_labels=compound_labels(manifest))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers,
                                         collate_fn=collate_identity, pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals,
                                         prefetch_factor=4 if cfg.data.num_workers else None)
    batches = iter(loader)

    run = None
    if rank == 0 and cfg.wandb.enabled:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        run_id_file = out / "wandb_run_id"
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
        run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity or None, dir=str(out),
                         mode=cfg.wandb.mode or os.environ.get("WANDB_MODE", "offline"), config=to_dict(cfg),
                         name=cfg.wandb.name or None, id=run_id, resume="allow" if run_id else None)
        run_id_file.write_text(run.id)

    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {cfg.method}", unit="step", dynamic_ncols=True)
    counts_by_worker: dict[int, dict] = {}
    counts: dict[str, int] = {}
    step_losses: dict[str, float] = {}     # stays empty when a finished run is resumed
    reported_corrupt = 0
    images_per_example = 2 if cfg.method in ("simclr", "clip") else 4
    exit_code = 0
    while state.step < cfg.steps:
        t0 = time.perf_counter()
        data_time = 0.0
        step_losses: dict[str, float] = {}
        for _ in range(cfg.engine.grad_accum):
            td = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - td
            state.data_position += 1
            counts_by_worker[batch["worker"]] = batch["counts"]
            parts = forward_loss(cfg.method, engine, batch, cfg, device, dtype)
            loss = parts["loss"]
            bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
            if world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item() > 0:
                if cfg.on_nonfinite == "stop":
                    if rank == 0:
                        print(f"train: non-finite loss at step {state.step} ({cfg.method}, loss {loss.item()}); "
                              f"stopping. Lower optim.lr, check the inputs, or set on_nonfinite=skip. "
                              f"The last checkpoint is in {ckpt_root}", file=sys.stderr)
                    exit_code = 1
                    break
                state.skipped_nonfinite += 1
                log.warning("skipping a batch with a non-finite loss at step %d", state.step)
                engine.zero_grad() if hasattr(engine, "zero_grad") else None
                continue
            engine.backward(loss)
            engine.step()
            for k, v in parts.items():
                step_losses[k] = step_losses.get(k, 0.0) + float(v.detach()) / cfg.engine.grad_accum
        if exit_code:
            break
        state.step += 1
        state.samples_seen += cfg.micro_batch * cfg.engine.grad_accum * world
        now = time.perf_counter()
        step_time = now - t0
        counts: dict[str, int] = {}
        for c in counts_by_worker.values():
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
        if counts.get("corrupt", 0) + counts.get("incomplete", 0) > reported_corrupt:
            reported_corrupt = counts.get("corrupt", 0) + counts.get("incomplete", 0)
            logging.getLogger("micon.data").warning("rank %d: %d corrupt or incomplete shard members skipped so far",
                                                    rank, reported_corrupt)
        if rank == 0:
            examples = cfg.micro_batch * cfg.engine.grad_accum * world
            metrics = {f"loss/{k}": v for k, v in step_losses.items()} | {
                "lr": scheduler.get_last_lr()[0], "samples_per_second": examples / step_time,
                "samples_per_second_per_device": examples / step_time / world,
                "images_per_second": examples * images_per_example / step_time,
                "data_wait_share": data_time / step_time, "step_time": step_time,
                "memory_mb": memory_mb(device), "samples_seen": state.samples_seen,
            } | {f"data/{k}": v for k, v in counts.items()}
            if run is not None and state.step % cfg.wandb.log_every == 0:
                run.log(metrics, step=state.step)
            with open(out / "metrics.jsonl", "a") as fh:   # plain-text twin of the wandb history
                fh.write(json.dumps({"step": state.step, **metrics}) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{step_losses.get('loss', float('nan')):.4f}",
                                data=f"{metrics['data_wait_share']:.0%}")
                bar.update(1)
        # agree on a requested stop: Slurm may signal only some ranks first
        stop = torch.tensor([float(flag.signum)])
        if world > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() > 0 or state.step % cfg.ckpt_every == 0 or state.step == cfg.steps:
            checkpoint.save(engine, ckpt_root, state.step, asdict(state), to_dict(cfg), cfg.keep_ckpts, rank)
            if stop.item() > 0:
                if rank == 0:
                    log.info("signal %d: checkpointed step %d in %s; exiting for requeue (resume=latest continues)",
                             int(stop.item()), state.step, ckpt_root)
                exit_code = EXIT_REQUEUE
                break
    if bar is not None:
        bar.close()
    if rank == 0 and exit_code == 0 and (step_losses or not (out / "final.json").is_file()):
        final = dict(method=cfg.method, step=state.step, samples_seen=state.samples_seen,
                     loss=step_losses.get("loss"), checkpoint=str(ckpt_root / checkpoint.tag_of(state.step)),
                     counts=counts)
        (out / "final.json").write_text(json.dumps(final, indent=1))
        log.info("finished %d steps; final loss %s; checkpoint %s", state.step,
                 "n/a" if final["loss"] is None else f"{final['loss']:.4f}", final["checkpoint"])
    elif rank == 0 and exit_code == 0:
        log.info("already finished: %d of %d steps done in %s", state.step, cfg.steps, ckpt_root)
    if run is not None:
        run.finish(exit_code=exit_code)
    distributed.shutdown()
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
