"""The package as a user gets it: a wheel built from the checkout, installed without
extras into a brand-new virtualenv, run from outside the repository.

Every other test runs in the dev environment, where the `dev`/`test` extras and the
editable install hide a runtime dependency missing from ``[project].dependencies`` or a
file missing from the wheel (issue 13). Nothing here is skipped: if the wheel cannot be
built or the venv cannot be made, the tests fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .test_cli import free_port

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DIST_NAME: str = PYPROJECT["project"]["name"]
VERSION: str = PYPROJECT["project"]["version"]
SCRIPT = "kernel-events-proxy"
# Subcommands that must exist; more may (they are discovered from the parser).
EXPECTED_COMMANDS = {
    ("serve",),
    ("upstream",),
    ("config",),
    ("config", "check"),
    ("tail",),
    ("wait",),
}

REQUIRED_FILES = (
    "proxy/py.typed",
    "proxy/ui/index.html",
    "proxy/ui/app.js",
    "proxy/ui/style.css",
    "proxy/ui/favicon.svg",
    "proxy/_pb/kernel_events/v1/events_pb2.py",
    "proxy/_pb/kernel_events/v1/events_pb2.pyi",
    "proxy/_pb/kernel_events/v1/events_pb2_grpc.py",
    "proxy/_pb/kernel_events/v1/events_pb2_grpc.pyi",
)

# Run by the new venv's interpreter. Every subcommand path of the installed parser,
# nested ones included: [["serve"], ["config"], ["config", "check"], ...].
LIST_COMMANDS = textwrap.dedent(
    """
    import argparse, json
    from proxy.cli import _build_parser

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield prefix + [name]
                    yield from walk(sub, prefix + [name])

    print(json.dumps(list(walk(_build_parser(), []))))
    """
)

# Imports every public module of the installed package (and all of proxy._pb), each
# failure with its traceback; also says where `proxy` and a dev-only package come from.
IMPORT_ALL = textwrap.dedent(
    """
    import importlib, importlib.util, json, pkgutil, traceback
    import proxy

    errors = {}
    modules = []

    def onerror(name):
        errors[name] = traceback.format_exc()

    for info in pkgutil.walk_packages(proxy.__path__, "proxy.", onerror=onerror):
        parts = info.name.split(".")[1:]
        if parts[0] != "_pb" and any(p.startswith("_") for p in parts):
            continue
        modules.append(info.name)
        try:
            importlib.import_module(info.name)
        except BaseException:
            errors[info.name] = traceback.format_exc()
    print(json.dumps({
        "file": proxy.__file__,
        "version": proxy.__version__,
        "modules": modules,
        "errors": errors,
        "pytest": importlib.util.find_spec("pytest") is not None,
    }))
    """
)

# The third-party top-level modules the installed package imports at run time (not
# under `if TYPE_CHECKING:`), the distributions providing each, and the package's
# declared (non-extra) requirements.
IMPORTED_DISTRIBUTIONS = textwrap.dedent(
    """
    import ast, json, pathlib, sys
    import importlib.metadata as md
    import proxy

    class Imports(ast.NodeVisitor):
        def __init__(self):
            self.names = set()

        def visit_If(self, node):
            test = ast.unparse(node.test)
            if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                self.generic_visit(node)
            else:
                for child in node.orelse:
                    self.visit(child)

        def visit_Import(self, node):
            self.names.update(a.name.split(".")[0] for a in node.names)

        def visit_ImportFrom(self, node):
            if node.level == 0 and node.module:
                self.names.add(node.module.split(".")[0])

    imports = Imports()
    for path in pathlib.Path(proxy.__file__).parent.rglob("*.py"):
        imports.visit(ast.parse(path.read_text(encoding="utf-8")))
    third_party = sorted(
        n for n in imports.names if n not in sys.stdlib_module_names and n != "proxy"
    )
    providers = md.packages_distributions()
    print(json.dumps({
        "imports": {n: providers.get(n, []) for n in third_party},
        "requires": md.distribution(sys.argv[1]).requires or [],
    }))
    """
)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _checkout_files(root: Path) -> list[Path]:
    """The checkout as git sees it: tracked and new files, not ignored ones (venvs,
    node_modules, build/, *.egg-info, caches), uncommitted edits included."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [root / name for name in listed.split("\0") if name and (root / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built once for this module.

    ``pip wheel <dir>`` builds in place: setuptools leaves ``build/`` and
    ``*.egg-info`` in the source directory (and a stale ``build/lib`` would carry a
    deleted module into the next wheel). So the checkout is copied to a temporary
    directory and built there; the repository itself is never written to.
    """
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    for path in _checkout_files(ROOT):
        target = source / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    out = base / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(source)],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    assert wheels[0].name == f"{_normalize(DIST_NAME).replace('-', '_')}-{VERSION}-py3-none-any.whl"
    return wheels[0]


@dataclass(frozen=True)
class Installed:
    """A fresh venv with only the wheel (and its declared dependencies) installed."""

    venv: Path
    workdir: Path  # outside the repository: `import proxy` cannot find the source tree
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def script(self) -> Path:
        return self.venv / "bin" / SCRIPT

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.script), *args)

    def python_json(self, code: str, *args: str) -> Any:
        """Run ``code`` in the venv's interpreter (isolated: no PYTHON* variables, no
        cwd on sys.path) and parse what it prints."""
        result = self.run(str(self.python), "-I", "-c", code, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)


def _user_env(venv: Path) -> dict[str, str]:
    """The caller's environment minus anything pointing at the dev setup or tuning
    the proxy: no PYTHONPATH, no VIRTUAL_ENV, no KEP_*/BACKEND_* settings, and no
    PATH entry inside the repository (the dev venv's bin)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "KEP_", "BACKEND_"))
        and key not in {"VIRTUAL_ENV", "CONDA_PREFIX", "__PYVENV_LAUNCHER__"}
    }
    path = [
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry and not Path(entry).resolve().is_relative_to(ROOT)
    ]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """``python -m venv`` (no system site-packages) + ``pip install <wheel>``: no extras."""
    base = tmp_path_factory.mktemp("installed")
    assert not base.resolve().is_relative_to(ROOT)
    venv = base / "venv"
    workdir = base / "work"
    workdir.mkdir()
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(venv)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    target = Installed(venv, workdir, _user_env(venv))
    install = target.run(
        str(target.python), "-m", "pip", "install", "--no-input", str(wheel), timeout=600
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert target.script.is_file()
    return target


# --- The wheel ------------------------------------------------------------------------


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"{_normalize(DIST_NAME).replace('-', '_')}-{VERSION}.dist-info"
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()

    missing = [name for name in REQUIRED_FILES if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    # Every file of the source package (modules, stubs, UI files, py.typed), so a new
    # module or asset is covered without touching this test.
    source = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "proxy").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert {n for n in source if n.endswith(".py")}, "no modules found in the source tree"
    assert not source - names, f"in the source tree but not in the wheel: {sorted(source - names)}"
    # Nothing but the package and its metadata: no tests/, bench/, scripts/ packages.
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"proxy", dist_info}, top_level
    assert f"{SCRIPT} = proxy.cli:main" in entry_points
    assert f"\nVersion: {VERSION}\n" in metadata


# --- The installed package ------------------------------------------------------------


def test_every_public_module_imports_from_the_venv(installed: Installed) -> None:
    report = installed.python_json(IMPORT_ALL)
    location = Path(report["file"]).resolve()
    assert location.is_relative_to(installed.venv.resolve()), location
    assert not location.is_relative_to(ROOT), location
    assert not report["pytest"], "the new venv has dev packages: it is not a clean install"
    assert report["version"] == VERSION
    errors: dict[str, str] = report["errors"]
    assert not errors, "\n".join(f"{name}:\n{trace}" for name, trace in errors.items())
    modules = set(report["modules"])
    assert {"proxy.cli", "proxy.client", "proxy.tail", "proxy.wait"} <= modules, modules
    assert {
        "proxy._pb.kernel_events.v1.events_pb2",
        "proxy._pb.kernel_events.v1.events_pb2_grpc",
    } <= modules, modules
    # Every public module file that was installed was walked (and so imported).
    package = location.parent
    on_disk = {
        ".".join(("proxy", *path.relative_to(package).with_suffix("").parts))
        for path in package.rglob("*.py")
        if path.name != "__init__.py"
    }
    public = {
        name
        for name in on_disk
        if name.startswith("proxy._pb.")
        or not any(part.startswith("_") for part in name.split(".")[1:])
    }
    assert public <= modules, sorted(public - modules)


def test_every_imported_distribution_is_declared(installed: Installed) -> None:
    """A module imported only because another dependency happens to pull it in (h11
    through hypercorn, werkzeug through quart) still has to be declared."""
    report = installed.python_json(IMPORTED_DISTRIBUTIONS, DIST_NAME)
    declared = {
        _normalize(match.group(0))
        for requirement in report["requires"]
        if "extra ==" not in requirement
        and (match := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement))
    }
    imports: dict[str, list[str]] = report["imports"]
    assert imports, "found no third-party imports: the scan is broken"
    undeclared = {
        module: providers
        for module, providers in imports.items()
        if not any(_normalize(p) in declared for p in providers)
    }
    assert not undeclared, (
        f"imported but not in [project].dependencies (module: providing distributions): "
        f"{undeclared}; declared: {sorted(declared)}"
    )


def test_help_and_version(installed: Installed) -> None:
    result = installed.cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {SCRIPT}")
    version = installed.cli("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"{SCRIPT} {VERSION}"


def test_every_subcommand_has_help(installed: Installed) -> None:
    commands = {tuple(path) for path in installed.python_json(LIST_COMMANDS)}
    assert commands >= EXPECTED_COMMANDS, f"missing subcommands: {EXPECTED_COMMANDS - commands}"
    top = installed.cli("--help").stdout
    for path in sorted(commands):
        if len(path) == 1:
            assert path[0] in top, f"{path[0]} not in --help:\n{top}"
        result = installed.cli(*path, "--help")
        assert result.returncode == 0, (path, result.stdout + result.stderr)
        assert result.stdout.startswith(f"usage: {SCRIPT} {' '.join(path)}"), result.stdout


def test_config_check_masks_secrets(installed: Installed) -> None:
    secret = "installed-secret-do-not-print"
    config = installed.workdir / "proxy.toml"
    config.write_text(
        "[[keypairs]]\n"
        'access_key = "AKINSTALLED"\n'
        f'secret_key = "{secret}"\n'
        'role = "admin"\n'
        'user_id = "u-installed"\n'
        'domain = "research"\n'
    )
    result = installed.cli("config", "check", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert secret not in result.stdout + result.stderr
    effective = json.loads(result.stdout)
    [keypair] = effective["keypairs"]
    assert keypair["access_key"] == "AKINSTALLED"
    assert keypair["role"] == "admin"
    assert keypair["user_id"] == "u-installed"
    assert keypair["domain"] == "research"
    assert keypair["secret_key"] != secret
    assert set(keypair["secret_key"]) == {"*"}


# --- serve --demo -----------------------------------------------------------------------

# No proxy from the environment for requests to the loopback server.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, accept: str) -> tuple[int, str, bytes]:
    assert url.startswith("http://127.0.0.1:"), url
    request = urllib.request.Request(url, headers={"Accept": accept})  # noqa: S310 (loopback)
    with _OPENER.open(request, timeout=5) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


@pytest.fixture
def demo(installed: Installed) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``serve --demo`` from the venv; its output goes to a file, not a pipe nobody reads."""
    port = free_port()
    log = installed.workdir / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(installed.script), "serve", "--demo", "--bind", f"127.0.0.1:{port}"],
            cwd=installed.workdir,
            env=installed.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_demo_answers_and_stops_on_sigterm(
    demo: tuple[subprocess.Popen[bytes], str, Path], wheel: Path
) -> None:
    proc, url, log = demo
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, f"serve exited {proc.returncode}:\n{log.read_text()}"
        try:
            status, content_type, body = _get(f"{url}/", "application/json")
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer on {url} in 30 s:\n{log.read_text()}") from None
            time.sleep(0.1)
    assert status == 200
    assert content_type.startswith("application/json"), content_type
    document = json.loads(body)
    assert "version" in document
    assert document["proxy"] == VERSION

    with zipfile.ZipFile(wheel) as zf:
        index_html = zf.read("proxy/ui/index.html")
    status, content_type, body = _get(f"{url}/", "text/html")
    assert status == 200
    assert content_type.startswith("text/html"), content_type
    assert body == index_html

    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"serve ignored SIGTERM for 10 s:\n{log.read_text()}") from None
    assert code == 0, log.read_text()
