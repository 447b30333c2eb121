"""`qwenvl-ft doctor`: the core stack against the declared range, the optional packages, the accelerator and the
kernel paths."""

import importlib.metadata

from packaging.specifiers import SpecifierSet

from qwenvl_ft.commands import doctor
from qwenvl_ft.commands.cli import main


def test_doctor_lists_the_core_stack_against_its_tested_range(capsys):
    """Each core package with its installed version, the declared range and whether it is inside (.ci/newest runs
    this past the upper bounds: then the verdict and the status say so)."""
    status = main(["doctor"])
    out = capsys.readouterr().out
    declared, inside = doctor.declared_ranges(), []
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "qwen-vl-utils"):
        version = importlib.metadata.version(name)
        inside.append(SpecifierSet(declared[name]).contains(version))
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert line.split()[:3] == [name, version, declared[name]]
        assert line.endswith("ok" if inside[-1] else "OUTSIDE the tested range")
    assert status == (0 if all(inside) else 1)
    assert "transformers" in declared and "<" in declared["transformers"]  # an upper bound CI has run
    for section in ("optional", "accelerator", "attention and kernel paths"):
        assert section in out
    assert "torch varlen_attn (torch >= 2.10): " in out and "deepspeed" in out


def test_doctor_names_a_package_outside_the_tested_range_and_fails(monkeypatch, capsys):
    ranges = dict(doctor.declared_ranges(), transformers=">=99")
    monkeypatch.setattr(doctor, "declared_ranges", lambda: ranges)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.split()[:1] == ["transformers"])
    assert line.endswith("OUTSIDE the tested range") and ">=99" in line
    assert "install qwenvl-ft again" in out


def test_doctor_names_a_missing_core_package(monkeypatch, capsys):
    missing, real = "trl", doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda name: None if name == missing else real(name))
    assert main(["doctor"]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == [missing])
    assert line.split()[1] == "-" and line.endswith("MISSING")
