"""Installing beside an existing torch: `pip install .` keeps a supported torch that is already there, and replaces
one below the floor.

pip's resolver runs for real (`pip install --dry-run --report`) in an environment that holds a different torch and
torchvision from this one: a throw-away venv whose site-packages hold only their metadata (what pip reads to decide)
and reach this environment's other packages through a .pth file. Nothing is downloaded (--no-index, --isolated:
no index, no find-links) and nothing is installed.
"""

import json
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("hatchling", reason="builds this project's metadata without network (the test extra has it)")


def _env_holding(tmp_path: Path, torch_version: str, torchvision_version: str) -> Path:
    """A venv whose torch and torchvision are `torch_version` / `torchvision_version`, and whose other packages
    are this environment's. Returns its python."""
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name, version, requires in (("torch", torch_version, []),
                                    ("torchvision", torchvision_version, [f"torch=={torch_version}"])):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("\n".join([f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
                                                 + [f"Requires-Dist: {r}" for r in requires]) + "\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    # After its own site-packages: the torch above shadows this environment's.
    here = sysconfig.get_paths()["purelib"]
    (site / "zz_rest_of_the_environment.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    return python


def _pip_install_dry_run(python: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Not --quiet: pip >= 26.3 writes the conflict's cause ("The conflict is caused by: ...") to stdout, at the
    level --quiet leaves out."""
    report = tmp_path / "report.json"
    return subprocess.run([str(python), "-m", "pip", "install", "--isolated", "--dry-run", "--report", str(report),
                           "--no-index", "--no-build-isolation", str(ROOT)],
                          capture_output=True, text=True, timeout=300)


def test_pip_install_keeps_an_installed_supported_torch(tmp_path):
    python = _env_holding(tmp_path, "2.6.0+cu124", "0.21.0+cu124")  # the floor, as a CUDA 12.4 build
    out = _pip_install_dry_run(python, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    planned = {item["metadata"]["name"]: item["metadata"]["version"]
               for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert list(planned) == ["qwenvl-ft"], planned  # torch, torchvision and everything else stay as they are
    kept = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('torch'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert kept == "2.6.0+cu124"


def test_a_torch_below_the_floor_is_not_kept(tmp_path):
    python = _env_holding(tmp_path, "2.5.1+cu124", "0.20.1+cu124")
    out = _pip_install_dry_run(python, tmp_path)
    # With no index to fetch a newer torch from, the resolver has to say it needs one.
    assert out.returncode != 0
    assert "torch>=2.6" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]

