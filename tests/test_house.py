"""The house rules on imports, as import-linter contracts (pyproject.toml [tool.importlinter]): the library
imports no job, only train imports train, no job imports another, only micon.distributed imports
torch.distributed, no package has an import cycle. Plus proof that each contract type breaks on the import it forbids, so a kept
contract means something."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO, job_env

LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(config: Path, cwd: Path, *pythonpath: Path) -> subprocess.CompletedProcess:
    env = job_env(PYTHONPATH=":".join(map(str, (*pythonpath, REPO))))
    return subprocess.run([LINT, "--no-cache", str(config)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_import_contracts_hold():
    proc = lint(REPO / "pyproject.toml", REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in proc.stdout


def test_each_contract_breaks_on_what_it_forbids(tmp_path):
    pkg = tmp_path / "src" / "lib"
    (tmp_path / "src" / "job").mkdir(parents=True)
    (tmp_path / "src" / "other_job").mkdir()
    pkg.mkdir()
    files = {
        "lib/__init__.py": "",
        "lib/distributed.py": "import torch.distributed as dist\n",
        "lib/uses_job.py": "from job import run\n",
        "lib/collective_a.py": "from torch import nn, distributed\n",
        "lib/collective_b.py": "from torch.distributed import all_reduce\n",
        "lib/fine.py": "import torch\nfrom torch import nn\nimport torch.distributions\n",
        "lib/cycle_a.py": "import lib.cycle_b\n",
        "lib/cycle_b.py": "from lib import cycle_a\n",
        "job/__init__.py": "",
        "job/run.py": "import lib.fine\n",
        "other_job/__init__.py": "",
        "other_job/main.py": "from job.run import lib\n",
    }
    for name, text in files.items():
        (tmp_path / "src" / name).write_text(text)
    config = tmp_path / "contracts.toml"
    config.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_packages = ["lib", "job", "other_job"]
        include_external_packages = true
        contract_types = ["only_importers: tests.importrules.OnlyImportersContract"]

        [[tool.importlinter.contracts]]
        name = "lib imports no job"
        type = "forbidden"
        source_modules = ["lib"]
        forbidden_modules = ["job"]

        [[tool.importlinter.contracts]]
        name = "collectives in one module"
        type = "only_importers"
        imported = "torch.distributed"
        allowed = ["lib.distributed"]

        [[tool.importlinter.contracts]]
        name = "no job imports another"
        type = "independence"
        modules = ["job", "other_job"]

        [[tool.importlinter.contracts]]
        name = "no cycles"
        type = "acyclic_siblings"
        ancestors = ["lib"]
    """))
    proc = lint(config, tmp_path, tmp_path / "src")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 0 kept, 4 broken." in proc.stdout
    assert "other_job is not allowed to import job" in proc.stdout
    assert "No cycles are allowed in lib." in proc.stdout
    assert "lib.uses_job -> job.run" in proc.stdout
    assert "lib.collective_a:1: from torch import nn, distributed" in proc.stdout
    assert "lib.collective_b:1: from torch.distributed import all_reduce" in proc.stdout
    assert "lib.fine" not in proc.stdout.split("collectives in one module")[-1]
    assert "lib.distributed:" not in proc.stdout
