"""Two gloo ranks: mean of per-rank losses == single-process loss on the concatenated batch, and the
per-rank gradients (summed through the all-gather, then averaged as DDP does) == single-process gradients.

Run as a script, this file is one rank's worker; pytest starts two of them with subprocess.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORLD = 2
N_LOCAL = 4  # examples per rank
DIM = 5


def _global_inputs() -> dict[str, torch.Tensor]:
    """The concatenated batch: rank r owns rows [r*N_LOCAL, (r+1)*N_LOCAL) of every tensor."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * N_LOCAL
    x = {k: torch.randn(n, 2, DIM, generator=g, dtype=torch.float64)
         for k in ("treated", "control", "generated", "target")}
    x["image"] = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    x["molecule"] = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    x["supcon"] = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    # rank-local labels (repeat within a rank, reused across ranks) ...
    x["local_labels"] = torch.tensor([0, 1, 0, 2, 0, 1, 2, 3])
    # ... and global compound ids shared across ranks (compound 11 on both)
    x["global_labels"] = torch.tensor([11, 4, 11, 6, 11, 8, 9, 6])
    # supcon rows without positives, a different number on each rank
    x["supcon_labels"] = torch.tensor([0, 1, 0, 5, 2, 2, 3, 4])
    return x


def _losses(x: dict[str, torch.Tensor], labels_key: str, global_labels: bool, scale: torch.Tensor):
    from micon import losses
    lab = x[labels_key]
    return {
        "paclr_paper": losses.paclr_loss(x["treated"], x["control"], lab, 0.5, labels_are_global=global_labels),
        "paclr_official": losses.paclr_loss(x["treated"], x["control"], lab, 0.5, dmso_positives=True,
                                            labels_are_global=global_labels),
        "cf_union": losses.counterfactual_paclr_loss(x["generated"], x["target"], lab, 0.3,
                                                     labels_are_global=global_labels),
        "cf_cross": losses.counterfactual_paclr_loss(x["generated"], x["target"], lab, 0.3, mode="cross",
                                                     labels_are_global=global_labels),
        "simclr": losses.simclr_loss(x["treated"][:, 0], x["treated"][:, 1], 0.2),
        "clip": losses.clip_loss(x["image"], x["molecule"], scale),
        "supcon": losses.supcon_loss(x["supcon"], x["supcon_labels"], 0.4, labels_are_global=global_labels),
    }


FLOAT_KEYS = ("treated", "control", "generated", "target", "image", "molecule", "supcon")


def _value_and_grads(x, labels_key, global_labels):
    """{loss name: (value, {input: grad}, scale grad)} for one loss at a time."""
    out = {}
    for name in _losses(x, labels_key, global_labels, torch.tensor(2.0)):
        inputs = {k: (v.detach().clone().requires_grad_(True) if k in FLOAT_KEYS else v) for k, v in x.items()}
        scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        loss = _losses(inputs, labels_key, global_labels, scale)[name]
        loss.backward()
        grads = {k: inputs[k].grad.clone() if inputs[k].grad is not None else torch.zeros_like(inputs[k])
                 for k in FLOAT_KEYS}
        out[name] = (loss.detach(), grads, scale.grad.clone() if scale.grad is not None else torch.zeros(()))
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    x = _global_inputs()
    local = {k: v[rank * N_LOCAL:(rank + 1) * N_LOCAL] for k, v in x.items()}
    result = {mode: _value_and_grads(local, key, glob)
              for mode, key, glob in (("local", "local_labels", False), ("global", "global_labels", True))}
    from micon import distributed   # the control collectives the trainer uses
    result["control"] = {"max_vote": distributed.max_vote(3.0 * rank), "tag": distributed.broadcast_object(
        f"step{rank}", src=0), "gathered": distributed.gather_no_grad(torch.tensor([rank])).tolist()}
    distributed.barrier()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_losses_equal_single_process(tmp_path):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(WORLD)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x = _global_inputs()
    # single process: rank-local labels become globally unique by offsetting with the rank
    x["local_labels"] = x["local_labels"] + 100 * torch.arange(WORLD).repeat_interleave(N_LOCAL)
    x["supcon_local"] = x["supcon_labels"] + 100 * torch.arange(WORLD).repeat_interleave(N_LOCAL)
    for mode, key, glob in (("local", "local_labels", False), ("global", "global_labels", True)):
        if mode == "local":
            x_single = {**x, "supcon_labels": x["supcon_local"]}
        else:
            x_single = x
        single = _value_and_grads(x_single, key, glob)
        for name, (value, grads, scale_grad) in single.items():
            mean_loss = sum(r[mode][name][0] for r in ranks) / WORLD
            torch.testing.assert_close(mean_loss, value, msg=f"{mode} {name}: loss")
            for k in FLOAT_KEYS:
                # each rank's input gradient is the sum over all ranks' losses; DDP averages by WORLD
                dist_grad = torch.cat([r[mode][name][1][k] for r in ranks]) / WORLD
                torch.testing.assert_close(dist_grad, grads[k], msg=f"{mode} {name}: grad of {k}")
            # a replicated parameter (the CLIP logit scale): DDP average of per-rank gradients
            dist_scale = sum(r[mode][name][2] for r in ranks) / WORLD
            torch.testing.assert_close(dist_scale, scale_grad, msg=f"{mode} {name}: grad of logit scale")
    for r in ranks:
        assert r["control"] == {"max_vote": 3.0, "tag": "step0", "gathered": [0, 1]}
    # the cases are not degenerate: rank-local and global labelling give different losses
    assert not torch.isclose(ranks[0]["local"]["paclr_paper"][0], ranks[0]["global"]["paclr_paper"][0])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
