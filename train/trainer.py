"""The training loop as an object: set-up, resume, step, checkpoint, finish (torchtitan's Trainer shape).

Its state (step, samples seen, data position, seeds, skipped batches) is one `TrainState`, saved with
every checkpoint and restored on resume; the run's identity (data, method, model: train.identity) is
fixed at its first step, and a resume with another one is refused unless resume=force. The method
(micon.methods) builds the model and computes the loss; the Trainer never looks at the method's name.
Collectives go through micon.distributed. Works in-process with one rank (tests) as under torchrun or srun.

Its parts live beside it: train.state (TrainState, the loss window, stop signals), train.engine (DeepSpeed's
config, the optimiser kernel, the schedule, determinism), train.inputs (graphs, the molecule table, a started-
from encoder, checked before the first step), train.run_checkpoints (resume, the run record, saving) and
train.run_metrics (wandb, metrics.jsonl, the progress bar).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from micon import atomic, distributed
from micon.checkpoint import InferenceRecord, find_latest, model_config, tag_of
from micon.config import ConfigError, describe, to_dict
from micon.data.preprocess import Preprocessing
from micon.methods import get_method
from micon.models.image import resolve_input_norm
from micon.models.pretrained import WeightsError, is_pretrained
# the Trainer's parts, each in its own module; their names stay importable from here
from train.engine import (ds_config, environment_extensions, lr_lambda, memory_mb,  # noqa: F401
                          optimizer_kernel, restore_determinism, set_deterministic)
from train.inputs import check_graphs, check_molecule_table, compound_labels, load_image_encoder  # noqa: F401
from train.run_checkpoints import RunCheckpoints
from train.run_metrics import RunMetrics
from train.validation import Validator
from train.state import DataStopped, LossWindow, SignalFlag, TrainingStopped, TrainState  # noqa: F401

EXIT_OK, EXIT_STOPPED, EXIT_CONFIG, EXIT_REQUEUE = 0, 1, 2, 75
log = logging.getLogger("micon.train")


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.method = get_method(cfg.method)
        self.needs = self.method.data_needs(cfg.model)   # what the stream delivers for this method and model
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.state = TrainState(seed=cfg.seed, data_seed=cfg.seed, data_workers=cfg.data.num_workers)
        self.batches = None
        self.last_losses: dict[str, float] = {}
        self.window = LossWindow()     # the steps since metrics were last logged (fit() starts a fresh one)
        # set by setup(): the process group, the device, the shard set, the model's record and the engine
        self.flag: SignalFlag | None = None
        self.dist = None
        self.rank, self.world = 0, 1
        self.chance = float("nan")
        self.device = torch.device("cpu")
        self.bf16 = False
        self.dtype = torch.float32
        self.manifest = None
        self.record: InferenceRecord | None = None
        self.engine = self.optimizer = self.scheduler = None
        self.determinism_before: tuple[bool, bool, bool, bool] | None = None   # the process's settings, restored at the end
        self.checkpoints = RunCheckpoints(self)     # resume, the run record, saving (train.run_checkpoints)
        self.metrics = RunMetrics(self)             # wandb, metrics.jsonl, the progress bar (train.run_metrics)
        self.validator = Validator(self)            # held-out retrieval, keep-best, patience (train.validation)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> "Trainer":
        from micon.data.shards import Manifest

        cfg = self.cfg
        self.flag = SignalFlag()
        self.dist = distributed.init(cfg.engine.dist_timeout_s)
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.state.world_size = self.world
        # the loss of an encoder that tells nothing apart, for the gathered batch: logged beside the loss
        self.chance = self.method.chance_loss(cfg.micro_batch * self.world, cfg.loss)
        if self.rank != 0:
            logging.getLogger().setLevel(logging.WARNING)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.bf16 = cfg.engine.precision == "bf16" or (cfg.engine.precision == "auto" and cuda
                                                       and torch.cuda.is_bf16_supported())
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.manifest = Manifest.load(cfg.data.shards)
        self._check_crop()   # every rank reads the same manifest and stops alike
        problem, fingerprint_bits, table_dim = None, 0, 0
        if self.needs.molecules and self.rank == 0:
            try:
                if self.needs.vectors:
                    table_dim = check_molecule_table(self.manifest, cfg.model.molecule_table, self.out)
                else:
                    fingerprint_bits = check_graphs(self.manifest, cfg.data.graphs)
            except TrainingStopped as e:
                problem = str(e)
        # every rank stops, none waits in a collective; every rank builds the encoder for the store's fingerprints
        problem, fingerprint_bits, table_dim = distributed.broadcast_object((problem, fingerprint_bits, table_dim))
        if problem:
            raise TrainingStopped(problem)
        self.checkpoints.lock()   # one run per out= (exit 2 naming the other), and out= writable
        if self.rank == 0:   # config.yaml is written once the run's identity is checked (resume)
            self.out.mkdir(parents=True, exist_ok=True)
            log.info("training %s on %d process(es) via %s, %s, %s, ZeRO %d; config %s", self.method.name, self.world,
                     self.dist.launcher, self.device, "bf16" if self.bf16 else "fp32", cfg.engine.zero_stage,
                     describe(cfg))
            for line in cfg.unused():
                log.info("config: %s", line)
            if cfg.model.trainable != "all" and not is_pretrained(cfg.model.pretrained) and not cfg.model.init:
                log.warning("model.trainable=%s with model.pretrained=%s and no model.init: the frozen part of the "
                            "backbone keeps its random weights", cfg.model.trainable, cfg.model.pretrained)
        # the input normalisation as resolved (auto -> imagenet or none), so embed applies exactly this one
        model_record = {**to_dict(cfg.model), "input_norm": self._input_norm()}
        self.record = InferenceRecord(method=self.method.name, model=model_record,
                                      channels=list(self.manifest.channels),
                                      **self.method.feature_dims(cfg.model, fingerprint_bits, table_dim),
                                      preprocessing=Preprocessing(normalize=cfg.data.normalize).to_dict())
        self._build_engine()
        return self

    def _input_norm(self) -> str:
        """model.input_norm resolved: as set; for auto, what the run that model.init starts from used (its encoder
        was trained on those inputs), else ImageNet's for pretrained weights per channel (resolve_input_norm)."""
        from micon.checkpoint import CheckpointError, load_checkpoint

        m = self.cfg.model
        if m.input_norm == "auto" and m.init:
            try:
                return load_checkpoint(m.init).record.model.get("input_norm", "none")
            except CheckpointError:
                pass   # load_image_encoder names the problem when the weights are read
        return resolve_input_norm(m.input_norm, m.mode, is_pretrained(m.pretrained))

    def _check_crop(self) -> None:
        """data.augment.crop must fit the stored sites (the stream has no resize: a larger crop would be no crop)."""
        crop, shape = self.cfg.data.augment.crop, self.manifest.data.get("image_shape")
        if crop and shape and crop > min(shape[1:]):
            raise ConfigError(f"data.augment.crop={crop}: out of range, allowed 0 to {min(shape[1:])} (the sites "
                              f"stored in {self.manifest.root} are {shape[1]}x{shape[2]} px); choose a crop of at "
                              f"most {min(shape[1:])} (0 = the whole field) or rerun prep with a larger image_size")

    def _build_engine(self) -> None:
        environment_extensions()        # before DeepSpeed JIT-builds its shm op: once per environment
        import deepspeed

        cfg = self.cfg
        self.determinism_before = set_deterministic(cfg.deterministic)
        torch.manual_seed(cfg.seed)
        # model.init and pretrained weights start a fresh run only: a resumed one continues from its own checkpoint
        resuming = cfg.resume != "none" and (cfg.resume not in ("latest", "force") or find_latest(self.ckpt_root))
        try:
            # the recorded settings (input normalisation resolved), so training builds what embed rebuilds
            model = self.method.build_model(model_config(self.record.model), len(self.manifest.channels),
                                            self.record.atom_dim,
                                            self.record.bond_dim, self.record.fingerprint_bits, self.record.table_dim,
                                            load_weights=not resuming)
        except WeightsError as e:
            raise TrainingStopped(str(e)) from None
        if self.rank == 0:
            if model.image_encoder.weights_report:
                log.info("model.pretrained: %s", model.image_encoder.weights_report)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            log.info("model.trainable=%s: %s of %s parameters train (%.1f%%), %s frozen", cfg.model.trainable,
                     f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1), f"{total - trainable:,}")
        if cfg.model.init and not resuming:
            loaded = load_image_encoder(model, cfg.model.init, list(self.manifest.channels), cfg.model)
            if self.rank == 0:
                log.info("model.init: %s", loaded)
        if cfg.engine.channels_last == "on" or (cfg.engine.channels_last == "auto" and self.device.type == "cuda"):
            model.image_encoder.use_channels_last()
        if cfg.engine.compile:
            model.image_encoder.compile()   # in place: the state dict keeps its keys (checkpoints unchanged)
        if self.bf16:
            # DeepSpeed casts parameters to bf16 but not buffers: batch norm then meets bf16 weights with
            # float32 running statistics and fails ("expected scalar type BFloat16 but found Float")
            model = model.to(torch.bfloat16)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2],
                                        "weight_decay": cfg.optim.weight_decay},
                                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                      lr=cfg.optim.lr, **optimizer_kernel(cfg.optim.kernel, self.device))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config(cfg, self.world, self.bf16), dist_init_required=False)

    def resume(self) -> None:
        """Continue the run in out= if there is one (train.run_checkpoints)."""
        self.checkpoints.resume()

    def identity(self) -> dict:
        return self.checkpoints.identity()

    def start_stream(self) -> None:
        from micon.data.pipeline import ExampleStream, StreamConfig, collate_identity, ignore_stop_signals

        cfg = self.cfg
        rsets = self.use_replicate_sets()
        if self.rank == 0:
            log.info("data: %s", "replicate-set shards (pairs and same-plate controls co-located)" if rsets else
                     "plate shards" + (" + replicate pairing buffer" if self.needs.pairs else "")
                     + (" + control bank" if self.needs.controls else ""))
        stream_cfg = StreamConfig(needs=self.needs, batch_size=cfg.micro_batch, replicate_sets=rsets,
                                  shuffle_buffer=cfg.data.shuffle_buffer, pair_buffer=cfg.data.pair_buffer,
                                  pair_prefer=cfg.data.pair_prefer,
                                  pair_within_source=cfg.data.pair_within_source, resample=cfg.data.resample,
                                  preprocessing=Preprocessing(normalize=cfg.data.normalize),
                                  include_poscon=cfg.data.include_poscon, seed=self.state.data_seed,
                                  augment=cfg.data.augment)
        dataset = ExampleStream(cfg.data.shards, stream_cfg, self.rank, self.world, cfg.data.num_workers,
                                cfg.data.graphs or None, skip_batches=self.state.data_position,
                                compound_labels=compound_labels(self.manifest),
                                molecule_table=cfg.model.molecule_table or None)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers,
                                             collate_fn=collate_identity, pin_memory=self.device.type == "cuda",
                                             worker_init_fn=ignore_stop_signals,
                                             prefetch_factor=4 if cfg.data.num_workers else None)
        self.batches = iter(loader)

    def use_replicate_sets(self) -> bool:
        """data.stream=auto: replicate sets for methods that pair replicates, when the shard set has them;
        for one that pairs without controls (CLIP), whichever path reads fewer images per image used."""
        from micon.data.replicate_sets import stream_estimates

        mode, has = self.cfg.data.stream, self.manifest.replicate_sets is not None
        if mode == "replicate_sets" and not has:
            raise TrainingStopped(f"data.stream=replicate_sets but {self.manifest.root} has none: run "
                                  f"./launch.sh rsets {self.manifest.root}")
        use = self.needs.pairs and has if mode == "auto" else mode == "replicate_sets"
        if use and mode == "auto" and not self.needs.controls:
            streams = self.world * max(self.cfg.data.num_workers, 1)
            est = stream_estimates(self.manifest, streams, self.cfg.data.pair_buffer)
            use = est["replicate_sets"] >= est["plates"]
            if self.rank == 0:
                log.info("data: expected images used per image read %.2f from replicate sets, %.2f from plate "
                         "shards + pairing buffer (%d streams, pair_buffer %d): reading %s", est["replicate_sets"],
                         est["plates"], streams, self.cfg.data.pair_buffer,
                         "replicate sets" if use else "plate shards")
        if use and self.cfg.data.include_poscon and not self.manifest.replicate_sets["config"].get("include_poscon"):
            log.warning("data.include_poscon=true but the replicate sets were built without positive controls: "
                        "rebuild them with ./launch.sh rsets %s include_poscon=true", self.manifest.root)
        return use

    # ------------------------------------------------------------------ one step
    def _next_batch(self) -> dict:
        from micon.data.pipeline import DataStreamError

        try:
            batch, problem = next(self.batches), None
        except DataStreamError as e:   # re-raised from a loader worker with its traceback: keep the message
            batch, problem = None, str(e).strip().splitlines()[-1].split("DataStreamError: ", 1)[-1]
        # every rank learns whether any rank's stream stopped before anyone enters the loss's collectives;
        # the message travels from the lowest such rank
        failed = distributed.max_vote(self.world - self.rank if problem else 0)
        if failed > 0:
            raise DataStopped(distributed.broadcast_object(problem, src=int(self.world - failed)))
        self.state.data_position += 1
        self.metrics.note_batch(batch)
        return batch

    def step(self) -> None:
        """One optimizer step over `grad_accum` micro-batches with a finite loss on every rank, queued on the device
        without waiting for it. on_nonfinite=skip: a batch whose loss is non-finite on any rank is dropped by all
        ranks before backward (the host must see the loss: one device sync per micro-step); it moves the data
        position but neither the step counter, the engine nor the learning-rate schedule. on_nonfinite=stop: the
        window notes the first non-finite step on the device and `flush` stops the run there, before any
        checkpoint is written."""
        cfg, state, window = self.cfg, self.state, self.window
        done, in_a_row = 0, 0
        while done < cfg.engine.grad_accum:
            td = time.perf_counter()
            batch = self._next_batch()
            window.data_time += time.perf_counter() - td
            parts = self.method.loss(self.engine, self.method.to_device(batch, self.device, self.dtype), cfg.loss)
            if cfg.on_nonfinite == "skip" and distributed.max_vote(float(not torch.isfinite(parts["loss"]).item())):
                state.skipped_nonfinite += 1
                in_a_row += 1
                log.warning("skipping a batch with a non-finite loss at step %d (%d skipped in all)", state.step,
                            state.skipped_nonfinite)
                if in_a_row >= cfg.max_skips_in_a_row:
                    raise TrainingStopped(
                        f"{in_a_row} batches in a row had a non-finite loss at step {state.step} "
                        f"({self.method.name}); the model has probably diverged. Lower optim.lr and resume from "
                        f"the last checkpoint in {self.ckpt_root}")
                continue
            in_a_row = 0
            self.engine.backward(parts["loss"])
            self.engine.step()
            done += 1
            window.add(parts, state.step)
        state.step += 1
        state.samples_seen += self.examples_per_step
        window.steps += 1

    @property
    def examples_per_step(self) -> int:
        return self.cfg.micro_batch * self.cfg.engine.grad_accum * self.world

    def flush(self) -> dict:
        """The metrics of the steps since the last flush (means, rates over the window's wall time), after one
        device sync; every rank calls it at the same steps. on_nonfinite=stop: a non-finite loss on any rank
        stops every rank here, naming the first such step and rank."""
        window = self.window
        losses, bad_step, bad_loss = window.read()
        worst = distributed.max_vote(self.world - self.rank if bad_step >= 0 else 0)
        if worst > 0:
            src = int(self.world - worst)
            bad_step, bad_loss = distributed.broadcast_object((bad_step, bad_loss), src=src)
            raise TrainingStopped(
                f"non-finite loss at step {bad_step} ({self.method.name}, loss {bad_loss} on rank {src}); stopping. "
                f"Lower optim.lr, check the inputs, or set on_nonfinite=skip. The last checkpoint is in "
                f"{self.ckpt_root}")
        elapsed = time.perf_counter() - window.t0
        examples = self.examples_per_step * window.steps
        self.last_losses = losses
        return {f"loss/{k}": v for k, v in losses.items()} | {"loss/chance": self.chance,
            "lr": self.scheduler.get_last_lr()[0], "samples_per_second": examples / elapsed,
            "samples_per_second_per_device": examples / elapsed / self.world,
            "images_per_second": examples * self.method.images_per_example / elapsed,
            "data_wait_share": window.data_time / elapsed, "step_time": elapsed / max(window.steps, 1),
            "memory_mb": memory_mb(self.device), "samples_seen": self.state.samples_seen,
            "skipped_nonfinite": self.state.skipped_nonfinite, "grad_norm": self.grad_norm(),
        }

    def grad_norm(self) -> float:
        """The last step's global gradient norm before clipping (DeepSpeed's; NaN where it kept none)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def data_counts(self) -> dict[str, int]:
        return self.metrics.data_counts()

    @property
    def counts_at_start(self) -> dict[str, int]:
        """The data counters of the checkpoint resumed from (the run's counters continue from them)."""
        return self.metrics.counts_at_start

    @counts_at_start.setter
    def counts_at_start(self, counts: dict[str, int]) -> None:
        self.metrics.counts_at_start = counts

    def checkpoint(self) -> Path:
        return self.checkpoints.save()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> int:
        """Steps until cfg.steps, a stop request (checkpoint, exit 75) or a TrainingStopped."""
        cfg = self.cfg
        self.resume()
        self.start_stream()
        self.metrics.start()
        if cfg.val.every:
            self.validator.prepare()      # the wells chosen and their sites read before the first step
        self.window = LossWindow()
        if self.validator.out_of_patience():      # a rerun of a run that stopped early
            log.info("val.patience=%d: this run stopped early at step %d (best val/%s at step %d); nothing to do",
                     cfg.val.patience, self.state.step, self.validator.metric, self.validator.state["step"])
            return EXIT_OK
        while self.state.step < cfg.steps:
            self.step()
            self.metrics.step_done()
            step = self.state.step
            # agree on a requested stop: Slurm may signal only some ranks first (a CPU vote: no device sync)
            stop = distributed.max_vote(self.flag.signum)
            save = stop > 0 or step % cfg.ckpt_every == 0 or step == cfg.steps
            validate = self.validator.due(step)
            if save or validate or step % cfg.wandb.log_every == 0:
                row = self.flush()   # on_nonfinite=stop stops here, before a checkpoint of bad weights
                best = patience_out = False
                if validate:     # after the flush: validation time is not counted in the training throughput
                    row |= self.validator.run(step)
                    best = self.validator.improved(step, row) and bool(cfg.val.keep_best)
                    patience_out = self.validator.out_of_patience()
                self.metrics.report(row)
                if save or best or patience_out:
                    self.checkpoint()
                if best:
                    self.validator.mark_best(step)
                if save or best or patience_out:     # wandb.log_checkpoints: the checkpoint, by reference
                    self.metrics.log_checkpoint(self.ckpt_root / tag_of(step), step, ("best",) if best else ())
                self.window = LossWindow()
                if patience_out:
                    s = self.validator.state
                    log.info("val.patience=%d: no better val/%s in %d validations (best %.4f at step %d); stopping "
                             "early at step %d of %d", cfg.val.patience, self.validator.metric, s["since"],
                             s["value"], s["step"], step, cfg.steps)
                    return EXIT_OK
            if stop > 0:
                log.info("signal %d: checkpointed step %d in %s; exiting for requeue (resume=latest continues)",
                         int(stop), step, self.ckpt_root)
                return EXIT_REQUEUE
        return EXIT_OK

    def finish(self, exit_code: int) -> int:
        self.metrics.close_bar()
        final_path = self.out / "final.json"
        if self.rank == 0 and exit_code == EXIT_OK and (self.last_losses or not final_path.is_file()):
            final = dict(method=self.method.name, step=self.state.step, samples_seen=self.state.samples_seen,
                         loss=self.last_losses.get("loss"), checkpoint=str(self.ckpt_root / tag_of(self.state.step)),
                         counts=self.data_counts(), skipped_nonfinite=self.state.skipped_nonfinite,
                         precision="bf16" if self.bf16 else "fp32", zero_stage=self.cfg.engine.zero_stage,
                         world_size=self.world, **self.validator.summary())
            if self.state.step < self.cfg.steps:
                final["stopped_early"] = f"val.patience={self.cfg.val.patience} at step {self.state.step}"
            atomic.write_json(final_path, final)
            log.info("finished %d steps; final loss %s; checkpoint %s", self.state.step,
                     "n/a" if final["loss"] is None else f"{final['loss']:.4f}", final["checkpoint"])
        elif self.rank == 0 and exit_code == EXIT_OK:
            log.info("already finished: %d of %d steps done in %s", self.state.step, self.cfg.steps, self.ckpt_root)
        if self.rank == 0 and exit_code == EXIT_OK and self.cfg.export:
            from train.checkpoint import export
            final = json.loads(final_path.read_text())
            try:
                log.info("exported the model to %s", export(Path(final["checkpoint"]) / "model.pt", final,
                                                             self.cfg.export))
            except OSError as e:
                print(f"train: exporting the model to {self.cfg.export} failed ({e}); the run is complete in "
                      f"{self.out}: rerun the same command to export it", file=sys.stderr)
                exit_code = EXIT_STOPPED
        self.metrics.finish(exit_code)
        self.batches = None   # stops the loader workers
        self.flag.restore()
        if self.determinism_before is not None:
            restore_determinism(self.determinism_before)
        distributed.shutdown()
        self.checkpoints.unlock()
        return exit_code


def train(cfg) -> int:
    """Set up, fit and finish one run; returns the exit code (messages for people go to stderr)."""
    from micon.checkpoint import CheckpointError
    from micon.data.shards import ManifestError

    trainer = Trainer(cfg)
    try:
        trainer.setup()
        code = trainer.fit()
    except ConfigError as e:
        if trainer.rank == 0:
            print(f"train: {e}", file=sys.stderr)
        code = EXIT_CONFIG
    except (TrainingStopped, ManifestError, CheckpointError, FileNotFoundError) as e:
        if trainer.rank == 0:
            print(f"train: {e}", file=sys.stderr)
        code = EXIT_STOPPED
    except RuntimeError as e:       # a collective on a rank that stopped or died: one line on every rank left
        if not (kind := distributed.peer_failure(e)):
            raise
        print(f"train: {distributed.peer_failure_message(kind, trainer.rank, trainer.state.step, str(trainer.ckpt_root))}",
              file=sys.stderr)
        code = EXIT_STOPPED
    if trainer.engine is not None:
        code = trainer.finish(code)
    else:
        if trainer.flag is not None:
            trainer.flag.restore()
        if trainer.determinism_before is not None:
            restore_determinism(trainer.determinism_before)
        distributed.shutdown()
        trainer.checkpoints.unlock()
    return code
