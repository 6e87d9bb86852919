"""The .deb and install-pi.sh, installed into a clean Debian 12 root made by the test.

Builds the amd64 and arm64 packages (packaging/build-deb), installs the amd64 one with
``apt-get install ./x.deb`` into a debootstrap minbase root, checks the installed agent,
then remove, purge, and an offline install-pi.sh run from the wheelhouse. Root and
debootstrap are needed (CI has both). Phase times are printed (``-s`` shows them).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import remember
from tests.support.debroot import DebRoot

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
USER = "therelay-agent"
EM_X86_64, EM_AARCH64 = 62, 183  # ELF e_machine values

needs_dpkg = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None,
    reason="building the .deb needs dpkg-deb (apt-get install dpkg-dev)")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("debootstrap") is None or shutil.which("unshare") is None,
    reason="installing into a Debian root needs root, debootstrap and unshare (CI runs as "
           "root; scripts/setup-system --test installs debootstrap)")

TIMES: dict[str, float] = {}


class _timed:
    def __init__(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        TIMES[self.phase] = time.monotonic() - self.started
        print(f"timing: {self.phase}: {TIMES[self.phase]:.1f} s")


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("debs")
    with _timed("build-deb --arch all"):
        result = subprocess.run([str(ROOT / "packaging/build-deb"), "--arch", "all",
                                 "--out", str(out)], capture_output=True, text=True,
                                check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    built = {p.name.split("_")[2].removesuffix(".deb"): p for p in out.glob("*.deb")}
    assert sorted(p.name for p in built.values()) == [
        f"therelay-agent_{VERSION}_amd64.deb", f"therelay-agent_{VERSION}_arm64.deb"]
    return built


@pytest.fixture(scope="module")
def debroot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DebRoot]:
    path = tmp_path_factory.mktemp("debroot") / "root"
    with _timed("debootstrap minbase bookworm"):
        root = DebRoot.create(path)
    try:
        with root.mounted():
            with _timed("apt-get update"):
                root.run("apt-get", "update", "-q")
            yield root
    finally:
        root.remove()
        print("timing: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()))


def _elf_machines(deb: Path, dest: Path) -> dict[int, list[str]]:
    """e_machine of every shared object inside every wheel of the package's wheelhouse."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    machines: dict[int, list[str]] = {}
    for wheel in (dest / "opt/therelay-agent/wheelhouse").glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(".so") or ".so." in name.rsplit("/", 1)[-1]:
                    head = zf.open(name).read(20)
                    assert head[:4] == b"\x7fELF", name
                    machines.setdefault(int.from_bytes(head[18:20], "little"), []).append(
                        f"{wheel.name}:{name}")
    return machines


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True,
                          text=True, check=True).stdout.strip()


@needs_dpkg
@pytest.mark.parametrize(("arch", "machine"), [("arm64", EM_AARCH64), ("amd64", EM_X86_64)])
def test_every_compiled_wheel_matches_the_package_arch(
        debs: dict[str, Path], tmp_path: Path, arch: str, machine: int) -> None:
    deb = debs[arch]
    assert _field(deb, "Architecture") == arch
    assert _field(deb, "Version") == VERSION
    assert "python3-venv" in _field(deb, "Depends")
    machines = _elf_machines(deb, tmp_path / "x")
    assert set(machines) == {machine}, {m: names[:3] for m, names in machines.items()}
    compiled = {n.split(":")[0].split("-")[0] for n in machines[machine]}
    # the compiled dependencies the issue names are all there as binary wheels
    assert {"av", "cryptography", "cffi", "google_crc32c", "pylibsrtp", "aiohttp", "lxml",
            "zeroconf"} <= compiled
    wheels = [p.name for p in (tmp_path / "x/opt/therelay-agent/wheelhouse").glob("*.whl")]
    assert f"therelay_agent-{VERSION}-py3-none-any.whl" in wheels
    assert not [w for w in wheels if w.endswith((".tar.gz", ".zip"))]


def _stat(root: DebRoot, rel: str) -> os.stat_result:
    return (root.path / rel).lstat()


def _uid_gid(root: DebRoot, user: str) -> tuple[int, int] | None:
    entry = root.run("getent", "passwd", user, check=False).stdout.split(":")
    return (int(entry[2]), int(entry[3])) if len(entry) > 3 else None


@needs_dpkg
@needs_root
def test_deb_install_remove_purge(debs: dict[str, Path], debroot: DebRoot) -> None:
    root = debroot
    # The package's Depends, resolved from the mirror first, so that the file lists taken
    # around install and purge differ by the package's own files only.
    with _timed("apt-get satisfy <Depends of the .deb>"):
        root.apt("satisfy", _field(debs["amd64"], "Depends"))
    before = root.files()
    shutil.copy(debs["amd64"], root.path / "tmp")
    with _timed("apt-get install ./therelay-agent.deb (postinst: user, dirs, venv)"):
        installed = root.apt("install", f"/tmp/{debs['amd64'].name}")
    assert "0 upgraded, 1 newly installed" in installed.stdout

    # the agent runs from its venv, on the config the package installed
    out = root.run("therelay-agent", "--version", net=False).stdout
    assert out.strip() == f"therelay-agent {VERSION}"
    check = root.run("therelay-agent", "config", "check", "--config",
                     "/etc/therelay-agent/config.yaml", net=False)
    assert "config OK (/etc/therelay-agent/config.yaml)" in check.stdout
    assert "state_dir: /var/lib/therelay-agent" in check.stdout
    assert "testsrc://" in check.stdout
    # every compiled dependency loads on a minimal Debian (no runtime library missing)
    root.run("/opt/therelay-agent/venv/bin/python", "-c",
             "import av, aiortc, cryptography, google_crc32c, lxml.etree, pylibsrtp, "
             "zeroconf, aiohttp, yaml", net=False)

    # user, state and config directories as the unit expects them
    ids = _uid_gid(root, USER)
    assert ids is not None
    state = _stat(root, "var/lib/therelay-agent")
    assert (state.st_uid, state.st_gid, stat.S_IMODE(state.st_mode)) == (*ids, 0o700)
    conf_dir = _stat(root, "etc/therelay-agent")
    assert (conf_dir.st_uid, conf_dir.st_gid, stat.S_IMODE(conf_dir.st_mode)) == (0, ids[1], 0o750)
    conf = _stat(root, "etc/therelay-agent/config.yaml")
    assert (conf.st_uid, conf.st_gid, stat.S_IMODE(conf.st_mode)) == (0, ids[1], 0o640)
    assert root.run("dpkg-query", "-W", "-f=${Conffiles}", "therelay-agent").stdout.split()[0] \
        == "/etc/therelay-agent/config.yaml"
    wants = root.path / "etc/systemd/system/multi-user.target.wants/therelay-agent.service"
    assert os.readlink(wants) == "/lib/systemd/system/therelay-agent.service"
    assert (root.path / "lib/systemd/system/therelay-agent.service").is_file()
    assert (root.path / "usr/share/doc/therelay-agent/config.example.yaml").is_file()
    venv_link = os.readlink(root.path / "opt/therelay-agent/venv")
    assert venv_link.startswith("venvs/")

    # the documented first token, made as the agent's user, lands in the state directory
    made = root.run("therelay-agent", "token", "create", "--camera", "demo", "--ttl", "1h",
                    "--label", "deb test", user=USER, net=False)
    # one token, shown alone and inside the ready RTSP URL
    assert len(set(remember(made.stdout))) == 1 and "rtsp://token:" in made.stdout
    listed = root.run("therelay-agent", "token", "list", user=USER, net=False).stdout
    assert "camera:demo" in listed
    assert _stat(root, "var/lib/therelay-agent/agent.db").st_uid == ids[0]

    # doctor as the agent's user: everything local passes; the only thing allowed to fail
    # is what the test's network-less sandbox explains (no address for WebRTC viewers)
    doctor = root.run("therelay-agent", "doctor", "--json", user=USER, net=False, check=False)
    assert doctor.returncode in (0, 1), doctor.stderr[-2000:]
    assert "Traceback" not in doctor.stderr
    report = json.loads(doctor.stdout)
    status = {(c["group"], c["check"]): c["status"] for c in report["checks"]}
    for name in ("config", "state_dir", "database", "audit", "disk"):
        assert status[("agent", name)] == "ok", report
    assert status[("camera demo", "source")] == "ok", report
    failed = {key for key, value in status.items() if value == "fail"}
    assert failed <= {("agent", "ice")}, report
    assert report["exit_status"] == (1 if failed else 0) == doctor.returncode

    # reinstalling (as an upgrade does) builds a new venv and switches to it
    with _timed("dpkg reinstall (new venv, switch)"):
        root.apt("install", "--reinstall", f"/tmp/{debs['amd64'].name}")
    new_link = os.readlink(root.path / "opt/therelay-agent/venv")
    assert new_link != venv_link
    assert os.listdir(root.path / "opt/therelay-agent/venvs") == [new_link.split("/")[1]]

    with _timed("apt-get remove"):
        root.apt("remove", "therelay-agent")
    assert not (root.path / "opt/therelay-agent").exists()
    assert (root.path / "opt").is_dir()
    assert not (root.path / "usr/bin/therelay-agent").is_symlink()
    assert (root.path / "etc/therelay-agent/config.yaml").is_file()
    assert (root.path / "var/lib/therelay-agent/agent.db").is_file()
    assert _uid_gid(root, USER) is not None

    with _timed("apt-get purge"):
        root.apt("purge", "therelay-agent")
        assert not (root.path / "etc/therelay-agent").exists()
        assert not (root.path / "var/lib/therelay-agent").exists()
        assert _uid_gid(root, USER) is None
        assert root.run("getent", "group", USER, check=False).returncode != 0
        assert not wants.is_symlink()
    after = root.files()
    # shadow's own backups of the files useradd/userdel edited (any package that adds a
    # user leaves them); the live passwd, group and shadow no longer name the user
    assert sorted(after - before - {"etc/shadow-", "etc/gshadow-"}) == []
    for name in ("passwd", "group", "shadow", "gshadow"):
        assert USER not in (root.path / "etc" / name).read_text()
    assert sorted(before - after) == []


@needs_dpkg
@needs_root
def test_install_pi_offline_from_the_wheelhouse(debs: dict[str, Path],
                                                debroot: DebRoot) -> None:
    root = debroot
    root.run("dpkg", "--purge", "therelay-agent")  # whatever the test before left
    src = root.path / "root/src"
    shutil.rmtree(src, ignore_errors=True)
    for part in ("packaging", "systemd"):
        shutil.copytree(ROOT / part, src / part)
    shutil.copy(ROOT / "config.example.yaml", src)
    subprocess.run(["dpkg-deb", "-x", str(debs["amd64"]), str(root.path / "root/deb")],
                   check=True)
    wheelhouse = "/root/deb/opt/therelay-agent/wheelhouse"

    with _timed("install-pi.sh --wheelhouse (python3-venv from apt, agent offline)"):
        # apt may fetch python3-venv; pip itself runs with no network at all
        root.run("apt-get", "install", "-y", "-q", "--no-install-recommends",
                 "python3-venv")
        first = root.run("/root/src/packaging/install-pi.sh", "--wheelhouse", wheelhouse,
                         net=False)
    assert f"installed therelay-agent {VERSION}" in first.stdout
    assert root.run("therelay-agent", "--version", net=False).stdout.strip() \
        == f"therelay-agent {VERSION}"
    root.run("therelay-agent", "token", "list", user=USER, net=False)
    wants = root.path / "etc/systemd/system/multi-user.target.wants/therelay-agent.service"
    assert wants.is_symlink()
    state = _stat(root, "var/lib/therelay-agent")
    assert stat.S_IMODE(state.st_mode) == 0o700
    link = os.readlink(root.path / "opt/therelay-agent/venv")

    with _timed("install-pi.sh again (upgrade)"):
        root.run("/root/src/packaging/install-pi.sh", "--wheelhouse", wheelhouse, net=False)
    assert os.readlink(root.path / "opt/therelay-agent/venv") != link
    assert len(os.listdir(root.path / "opt/therelay-agent/venvs")) == 1

    # the copy it keeps uninstalls without the source tree
    root.run("/opt/therelay-agent/lib/install-pi.sh", "--uninstall", net=False)
    assert not (root.path / "opt/therelay-agent").exists()
    assert (root.path / "etc/therelay-agent/config.yaml").is_file()
    root.run("/root/src/packaging/install-pi.sh", "--uninstall", "--purge", net=False)
    assert not (root.path / "etc/therelay-agent").exists()
    assert not (root.path / "var/lib/therelay-agent").exists()
    assert not wants.is_symlink()
    assert _uid_gid(root, USER) is None


LIB = ROOT / "packaging/lib/therelay-setup.sh"


def _tiny_wheel(dest: Path, version: str) -> Path:
    """A minimal pure-Python wheel, so the venv steps can run without the network."""
    path = dest / f"trtiny-{version}-py3-none-any.whl"
    info = f"trtiny-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("trtiny.py", "VALUE = 1\n")
        zf.writestr(f"{info}/METADATA",
                    f"Metadata-Version: 2.1\nName: trtiny\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                    "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def _lib(scratch: Path, script: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "TRPKG_ROOT": str(scratch), "TR_PYTHON": sys.executable,
           "PIP_CONFIG_FILE": os.devnull}
    return subprocess.run(["sh", "-c", f'. "{LIB}"; {script}'], env=env, capture_output=True,
                          text=True, check=False)


def test_venv_switch_is_atomic_and_a_failed_install_changes_nothing(tmp_path: Path) -> None:
    scratch, wheels = tmp_path / "root", tmp_path / "wheels"
    wheels.mkdir()
    _tiny_wheel(wheels, "1.0")
    install = f'tr_install_venv --isolated --no-index --find-links "{wheels}" trtiny'
    assert _lib(scratch, install).returncode == 0
    venv = scratch / "opt/therelay-agent/venv"
    first = os.readlink(venv)

    failed = _lib(scratch, install.replace(str(wheels), str(tmp_path / "nothing")))
    assert failed.returncode == 1
    assert "nothing was changed" in failed.stderr
    assert os.readlink(venv) == first  # still the working venv, no half-built one beside it
    assert os.listdir(venv.parent / "venvs") == [first.split("/")[1]]

    _tiny_wheel(wheels, "2.0")
    assert _lib(scratch, f"{install} && tr_prune_venvs").returncode == 0
    second = os.readlink(venv)
    assert second != first
    assert os.listdir(venv.parent / "venvs") == [second.split("/")[1]]
    version = subprocess.run([str(venv / "bin/python"), "-c",
                              "import importlib.metadata as m; print(m.version('trtiny'))"],
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == "2.0"
