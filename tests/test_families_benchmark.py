"""benchmarks.families: the default targets across the installed model families, and what it flags."""

import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# benchmarks/ is not an installed package: make the repo root importable wherever pytest runs from.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import families  # noqa: E402


class _Block(nn.Module):
    def __init__(self, reads_weight: bool):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.reads_weight = reads_weight

    def forward(self, x):  # reading proj.weight itself, as BEiT's attention reads qkv.weight: an adapter never acts
        return F.linear(x, self.proj.weight, self.proj.bias) if self.reads_weight else self.proj(x)


def _model(reads_weight: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Block(False), _Block(reads_weight), nn.Linear(6, 2))


def test_an_adapter_that_never_acts_is_flagged_and_a_working_one_is_not():
    x = torch.randn(3, 6)
    good = families.check("good", _model(False), lambda m: m(x))
    assert (good["status"], good["rule"], good["layers"], good["idle"], good["reload"]) == (
        "ok",
        "blocks",
        2,
        0,
        "exact",
    )
    bad = families.check("bad", _model(True), lambda m: m(x))
    assert bad["status"] == "CHECK" and bad["idle"] == 1  # and merging moves the outputs, which it must not
    assert float(bad["merge_error"]) > 1e-3


def test_an_adapter_that_does_not_reload_is_flagged(monkeypatch):
    x = torch.randn(3, 6)
    monkeypatch.setattr(families, "_reload", lambda adapted, plain, route: plain)  # as if nothing were loaded
    for route in ("core", "peft"):
        lost = families.check("lost", _model(False), lambda m: m(x), route)
        assert lost["status"] == "CHECK" and float(lost["reload"]) > 0


def test_through_peft_the_same_checks_run_and_the_targets_are_compared_with_the_cores(monkeypatch):
    x = torch.randn(3, 6)
    good = families.check("good", _model(False), lambda m: m(x), route="peft")
    assert (good["status"], good["targets"], good["layers"], good["idle"], good["reload"]) == (
        "ok",
        "same",
        2,
        0,
        "exact",
    )
    bad = families.check("bad", _model(True), lambda m: m(x), route="peft")
    assert bad["status"] == "CHECK" and bad["idle"] == 1 and float(bad["merge_error"]) > 1e-3

    def adapt_one_layer(model, task_type):  # peft wrapping fewer layers than the core adapts
        wrapped, factors = adapt(model, task_type)
        return wrapped, dict(list(factors.items())[:1])

    adapt = families._adapt_with_peft
    monkeypatch.setattr(families, "_adapt_with_peft", adapt_one_layer)
    fewer = families.check("fewer", _model(False), lambda m: m(x), route="peft")
    assert (fewer["status"], fewer["targets"]) == ("CHECK", "differ: peft 1, core 2")


def test_a_timm_and_a_transformers_family_run_end_to_end(tmp_path: Path):
    out = tmp_path / "rows.csv"
    argv = ["--libraries", "timm", "classifier", "--only", "resnest", "longformer", "--out", str(out)]
    assert families.main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["library"], r["family"], r["rule"], r["status"]) for r in rows] == [
        ("timm", "resnest", "blocks", "ok"),
        ("transformers classifier", "longformer", "blocks", "ok"),
    ]
    assert families.main([*argv, "--route", "peft"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["family"], r["targets"], r["reload"], r["status"]) for r in rows] == [
        ("resnest", "same", "exact", "ok"),
        ("longformer", "same", "exact", "ok"),
    ]
