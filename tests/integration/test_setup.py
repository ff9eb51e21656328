"""Set-up edges (issue 7): CPU torch by default, a clear Python-version check, ``requires-python`` matching the pins,
and hub commands of the docs (README.md, docs/*.md) that exist in the pinned huggingface_hub."""

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60, **kw)


@needs_make
def test_default_torch_comes_from_the_cpu_index(tmp_path):
    p = _make("-n", "install", f"VENV={tmp_path / 'venv'}", "PYTHON=" + sys.executable)
    assert p.returncode == 0, p.stderr
    assert "pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in p.stdout
    p = _make("-n", "install", f"VENV={tmp_path / 'venv'}", "TORCH_SPEC=torch==2.13.0 --index-url X/cu128")
    assert "pip install -q torch==2.13.0 --index-url X/cu128" in p.stdout  # GPU users pass TORCH_SPEC


@needs_make
@pytest.mark.parametrize("version", ["3.10", "2.7", None])
def test_an_old_python_is_refused_in_one_line_before_the_venv(tmp_path, version):
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\n" + (f"echo {version}\n" if version else "exit 1\n"))
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    p = _make("install", f"PYTHON={fake}", f"VENV={venv}")
    assert p.returncode != 0 and not venv.exists()
    err = [line for line in p.stderr.splitlines() if not line.startswith("make")]
    assert len(err) == 1 and "needs Python >= 3.11" in err[0] and "PYTHON=python3.11" in err[0], p.stderr
    assert (version or "not a runnable Python") in err[0]


def _lower_bound(spec: str | None) -> tuple[int, ...]:
    m = re.search(r">=\s*(\d+(?:\.\d+)*)", spec or "")
    return tuple(int(x) for x in m.group(1).split(".")[:2]) if m else (0,)


def test_requires_python_matches_the_pins():
    """pyproject's requires-python is the highest lower bound among the pinned packages (as installed here)."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    bounds = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==", line.strip())
        if m:
            try:
                bounds[m.group(1)] = _lower_bound(metadata.metadata(m.group(1)).get("Requires-Python"))
            except metadata.PackageNotFoundError:
                pass
    assert len(bounds) >= 10, bounds
    assert _lower_bound(declared) == max(bounds.values()), (declared, bounds)
    assert "python=" + ".".join(map(str, _lower_bound(declared))) in (ROOT / "environment.yml").read_text()


def test_docs_hub_commands_exist_in_the_pinned_huggingface_hub():
    # README.md and docs/*.md: the hub commands are in docs/library.md (upload) and docs/reproducing.md (auth login)
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    assert "huggingface-cli" not in docs  # removed from huggingface_hub; it installs `hf`
    cmds = sorted(set(re.findall(r"(?:^|`|\n)\s*hf ([a-z-]+(?: [a-z-]+)?)", docs)))
    assert cmds, "the docs name no hf command"
    hf = Path(sys.executable).parent / "hf"
    if not hf.exists():
        pytest.skip("the hf command of huggingface_hub is not installed next to this Python")
    for cmd in cmds:
        words = cmd.split()
        p = subprocess.run([str(hf), *words, "--help"], capture_output=True, text=True, timeout=60)
        if p.returncode != 0 and len(words) > 1:  # "hf upload <repo>": the second word is an argument
            p = subprocess.run([str(hf), words[0], "--help"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (cmd, p.stderr[-500:])


def test_a_bare_copy_of_the_checkout_imports_its_own_kernels(tmp_path):
    """A copy of the tree run with ``PYTHONPATH`` (a worktree, the GPU machine's copy) imports the kernels beside its
    own rcp_lib, never those of the checkout installed in this environment; an installed package's parent
    (site-packages) is never searched."""
    copy = tmp_path / "copy"
    for name in ("rcp_lib", "kernels"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    code = "import rcp_lib, rcp_lib.kernels; print(rcp_lib.__file__); print(rcp_lib.kernels.__file__)"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(copy)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pkg, kern = (Path(line) for line in out.stdout.split())
    assert pkg == copy / "rcp_lib" / "__init__.py"
    assert kern == copy / "kernels" / "__init__.py"
    # without a pyproject.toml beside it (an installed layout) the folder above rcp_lib is not searched
    (copy / "pyproject.toml").unlink()
    out = subprocess.run([sys.executable, "-c", "import rcp_lib; print(rcp_lib.__path__)"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(copy) + "'" not in out.stdout and str(copy / "rcp_lib") in out.stdout


def test_the_integration_folder_is_the_integration_tier(request):
    """Every collected test under tests/integration/ carries the ``integration`` marker (make test-fast leaves it
    out): the tiers are folders (tests/conftest.py), checked on this session's own collection."""
    integration = ROOT / "tests" / "integration"
    mine = [it for it in request.session.items if integration in Path(str(it.path)).resolve().parents]
    assert request.node in mine
    assert not [it.nodeid for it in mine if it.get_closest_marker("integration") is None]
