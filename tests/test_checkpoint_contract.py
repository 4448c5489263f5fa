"""The inference checkpoint contract (micon.checkpoint): a model.pt describes itself, loads without
running code, and old or foreign files get a message a person can act on. Plus the house rule that keeps
it so: nothing branches on a method's name, and the Trainer's state exists from __init__ on (the import rules
are contracts: tests/test_house.py)."""
from __future__ import annotations

import ast
import re

import pytest
import torch

from micon.checkpoint import CheckpointError, InferenceRecord, load_checkpoint, save_model_file
from micon.methods import METHODS, get_method
from micon.models.factory import ModelConfig
from tests.conftest import REPO


@pytest.mark.parametrize("name", sorted(METHODS))
def test_record_rebuilds_the_same_image_encoder(tmp_path, name):
    method = get_method(name)
    cfg = ModelConfig(preset="tiny", molecule_dim=16, projection_dim=8)
    torch.manual_seed(0)
    model = method.build_model(cfg, 3, **method.feature_dims()).eval()
    record = InferenceRecord(method=name, model=vars(cfg), channels=["DNA", "RNA", "Mito"], **method.feature_dims(),
                             preprocessing={"normalize": "plate"})
    (tmp_path / "step00000007").mkdir()
    save_model_file(tmp_path / "step00000007" / "model.pt", model.state_dict(), record, {"method": name}, {"step": 7})
    (tmp_path / "latest").write_text("step00000007")
    ck = load_checkpoint(tmp_path)          # a checkpoints/ directory resolves to its latest step
    assert ck.record.method == name and ck.record.channels == ["DNA", "RNA", "Mito"]
    assert ck.preprocessing().normalize == "plate" and ck.state == {"step": 7}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ck.build_model().image_encoder(x), model.image_encoder(x))


@pytest.mark.parametrize("name", sorted(m for m, meth in METHODS.items() if meth.needs.molecules))
def test_a_fingerprint_checkpoint_rebuilds_the_whole_model_with_the_stores_size(tmp_path, name):
    method = get_method(name)
    cfg = ModelConfig(preset="tiny", molecule="fingerprint", molecule_dim=16, projection_dim=8)
    torch.manual_seed(0)
    model = method.build_model(cfg, 3, **method.feature_dims(cfg, fingerprint_bits=96)).eval()
    record = InferenceRecord(method=name, model=vars(cfg), channels=["DNA", "RNA", "Mito"],
                             **method.feature_dims(cfg, fingerprint_bits=96))
    save_model_file(tmp_path / "model.pt", model.state_dict(), record, {}, {})
    ck = load_checkpoint(tmp_path / "model.pt")
    assert (ck.record.fingerprint_bits, ck.record.atom_dim) == (96, 0)
    rebuilt = ck.build_model()            # strict load: every weight of the molecule encoder has its place
    bits = torch.randint(0, 2, (4, 96)).float()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.molecule_encoder(bits), model.molecule_encoder(bits))


def test_old_checkpoint_without_record_gets_a_clear_message(tmp_path):
    torch.save({"model": {}, "config": {"method": "simclr"}, "state": {}}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="written before checkpoints described themselves"):
        load_checkpoint(tmp_path / "model.pt")


class _Payload:
    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_model_file_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    torch.save({"model": {}, "record": payload}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint of plain tensors"):
        load_checkpoint(tmp_path / "model.pt")
    assert not marker.exists()


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"no model.pt at {tmp_path}"):
        load_checkpoint(tmp_path)


def test_nothing_in_the_loop_the_stream_or_the_benchmarks_branches_on_a_method_name():
    names = "|".join(METHODS)
    # `method == "micon"`, `cfg.method in ("clip", ...)`, `if name != 'simclr'`, `"micon" not in rows`,
    # `m.startswith("micon")`, `rows.loc["micon"]` ...
    pattern = re.compile(rf"""(==|!=|\bin|startswith\(|endswith\(|(?<=[\w\)\]])\[)\s*[\(\[{{]?\s*["']({names})[_"']"""
                         rf"""|["']({names})["']\s*(==|!=|\bin\b|\bnot in\b)""")
    offenders = []
    for folder in ("train", "micon/data", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []


def test_the_trainer_creates_all_its_state_in_init():
    """Every attribute a Trainer method assigns exists from __init__ on, so no code probes it with hasattr."""
    tree = ast.parse((REPO / "train" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assigned: dict[str, set[str]] = {}
    for fn in (n for n in trainer.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        assigned.setdefault(fn.name, set()).add(t.attr)
    outside = set().union(*(v for k, v in assigned.items() if k != "__init__")) - assigned["__init__"]
    assert outside == set()
    assert not re.search(r"hasattr\(trainer|hasattr\(self", (REPO / "train" / "trainer.py").read_text())
