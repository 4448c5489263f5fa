"""Slurm launch: batch templates (templates/), site settings (site.yaml), rendering and sbatch
submission (submit.py), and the Ray-on-Slurm readiness check (ray_nodes.py). Shell and a little
Python; no training or data logic lives here."""
