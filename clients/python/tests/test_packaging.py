"""Packaging: the client installs from a read-only checkout and from its sdist without writing
into the source folder, and the committed proto descriptor matches proto/."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its size, mode and modification time."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_size, st.st_mode, st.st_mtime_ns)
    return found


def set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755 if writable else 0o555)
        else:
            path.chmod(0o644 if writable else 0o444)


def run(args, **kwargs) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def pip_install(target: Path, source: Path) -> None:
    # No network and no build isolation: the build backend (flit_core, a test extra) and the
    # dependencies (grpcio, protobuf, rfc8785) come from this environment.
    run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-build-isolation", "--no-deps", "--no-index", "--target", target, source])


def assert_importable_from(site: Path, cwd: Path) -> None:
    check = (
        "import sys, idemd_client\n"
        "from idemd_client import Client, RateLimited, pb\n"
        "assert idemd_client.__file__.startswith(sys.argv[1]), idemd_client.__file__\n"
        "request = pb.AcquireRequest(namespace='n', key='k')\n"
        "request.lease_ttl.FromMilliseconds(1500)\n"
        "assert pb.AcquireRequest.FromString(request.SerializeToString()) == request\n"
        "print('imported', idemd_client.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = run([sys.executable, "-c", check, site], cwd=cwd, env=env)
    assert "imported" in out


def test_installs_from_a_read_only_checkout_and_from_its_sdist(tmp_path):
    source = tmp_path / "checkout" / "clients" / "python"
    shutil.copytree(
        CLIENT, source, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "build", "dist", "*.egg-info")
    )
    # Only the client's folder: no ../../proto next to it, as in an sdist or a vendored copy.
    set_writable(source, False)
    before = snapshot(source)
    try:
        site = tmp_path / "site-from-path"
        pip_install(site, source)

        sdist_dir = tmp_path / "sdist"
        sdist_dir.mkdir()
        name = run(
            [sys.executable, "-c", "import sys, flit_core.buildapi as b; print(b.build_sdist(sys.argv[1]))", sdist_dir],
            cwd=source,
        ).strip().splitlines()[-1]
        sdist = sdist_dir / name
        assert sdist.is_file() and name.endswith(".tar.gz"), name
        site_from_sdist = tmp_path / "site-from-sdist"
        pip_install(site_from_sdist, sdist)

        assert snapshot(source) == before, "installing wrote into the source folder"
    finally:
        set_writable(source, True)
    for installed in (site, site_from_sdist):
        assert not (installed / "idemd_client" / "_gen").exists()
        assert_importable_from(installed, tmp_path)


def test_committed_descriptor_matches_the_proto():
    from idemd_client import generate

    with open(generate.DESCRIPTOR_MODULE, encoding="utf-8") as f:
        committed = f.read()
    assert committed == generate.render(generate.compile_descriptor()), (
        "idemd_client/_descriptor.py is stale: run `python -m idemd_client.generate` in clients/python"
    )
