"""llama.cpp's own tools (llama-server, llama-quantize, llama-imatrix) as baselines, built from
the llama.cpp source vendored in the llama-cpp-python sdist of the installed version.

    .venv/bin/python benchmarks/llama_tools.py       # build once (about 10 minutes on 2 cores), print the folder
    bin_dir = llama_tools.build(("llama-server",))   # the folder of the binaries and their shared libraries

The build is cached in .cache/llama.cpp-<version>/ (git-ignored): `bin/` (the binaries and the
libllama/libggml libraries they load, found through their $ORIGIN run path or LD_LIBRARY_PATH=bin),
`source/` (the sdist's vendor/llama.cpp, for a later build of more tools and for tests that need
llama.cpp's scripts), `build.json` (version, flags, minutes) and `build.log`. It is built in a
temporary folder next to it and renamed into place when complete: an interrupted build leaves no
cache and is done again (its leftovers are removed by the next build).

The source comes from POCKETLM_LLAMA_CPP_SOURCE (a llama.cpp source tree of the installed
version) if set, else from the sdist, fetched from PyPI with `pip download` (about 75 MB; not
kept). With no cmake or C++ compiler, or no way to get the source, `build` raises
ToolsUnavailable with the reason (serve_bench.py reports the variant as skipped).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
VENDOR = "vendor/llama.cpp/"  # the llama.cpp tree inside llama-cpp-python's sdist
TOOLS = ("llama-server", "llama-quantize", "llama-imatrix")  # built together: one build serves them all
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # no web UI (else the build downloads one from the Hub)
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",  # the binaries find their libraries after the rename too
)
BUILD_MINUTES = 10  # on this project's 2-core machine


class ToolsUnavailable(RuntimeError):
    """llama.cpp's tools cannot be built here (the message says why)."""


def llama_cpp_python_version() -> str:
    try:
        return installed_version("llama-cpp-python")
    except PackageNotFoundError:
        raise ToolsUnavailable("llama-cpp-python is not installed: its version picks the llama.cpp source") from None


def cache_dir(version: str | None = None) -> Path:
    """Where the tools of llama-cpp-python `version` (default: the installed one) are built."""
    return CACHE / f"llama.cpp-{version or llama_cpp_python_version()}"


def download_sdist(version: str, into: Path, timeout: float = 1200) -> Path:
    """llama-cpp-python `version`'s sdist, fetched with pip into the folder `into`."""
    cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps"]
    cmd += ["--no-binary", ":all:", "--dest", str(into)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolsUnavailable(f"`{' '.join(cmd)}` took over {timeout / 60:.0f} minutes") from None
    sdists = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode or not sdists:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise ToolsUnavailable(
            f"could not download llama-cpp-python {version}'s sdist (`{' '.join(cmd)}` exited "
            f"{proc.returncode}):\n{tail}\n"
            "Without PyPI, point POCKETLM_LLAMA_CPP_SOURCE at a llama.cpp source tree of that version."
        )
    return sdists[0]


def unpack_vendored(sdist: Path, dest: Path, keep: Callable[[str], bool] = lambda rel: True) -> None:
    """The sdist's vendor/llama.cpp files whose path relative to it passes `keep`, into `dest`
    (created). Only regular files and directories are written: an absolute or `..` member, or
    a link, in that tree raises ToolsUnavailable before anything is written."""
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
        # <name>-<version>/vendor/llama.cpp/ (the sdist also holds .git/modules/vendor/llama.cpp/)
        roots = {
            f"{m.name.split('/', 1)[0]}/{VENDOR}" for m in members if m.name.split("/")[1:3] == VENDOR.split("/")[:2]
        }
        if len(roots) != 1:
            raise ToolsUnavailable(f"{sdist.name}: expected one {VENDOR} tree, found {len(roots)}")
        root = roots.pop()
        chosen = []
        for member in members:
            if not member.name.startswith(root):
                continue
            rel = member.name[len(root) :].strip("/")
            if not rel or not keep(rel):
                continue
            if member.name.startswith("/") or Path(member.name).is_absolute() or ".." in Path(member.name).parts:
                raise ToolsUnavailable(f"{sdist.name}: unsafe member {member.name!r}")
            if member.issym() or member.islnk():
                raise ToolsUnavailable(f"{sdist.name}: link member {member.name!r} in {VENDOR}")
            if member.isfile() or member.isdir():
                chosen.append((member, rel))
        if not chosen:
            raise ToolsUnavailable(f"{sdist.name}: nothing to unpack under {VENDOR}")
        dest.mkdir(parents=True, exist_ok=True)
        for member, rel in chosen:
            target = dest / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise ToolsUnavailable(f"{sdist.name}: cannot read {member.name!r}")
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            if member.mode & 0o111:
                target.chmod(0o755)


def source_tree(version: str | None = None) -> Path | None:
    """An unpacked llama.cpp source tree of `version` already on this machine, if any."""
    tree = cache_dir(version) / "source"
    return tree if (tree / "CMakeLists.txt").is_file() else None


def _have(bin_dir: Path, tools: Iterable[str]) -> bool:
    return all((bin_dir / tool).is_file() and os.access(bin_dir / tool, os.X_OK) for tool in tools)


def _check_toolchain() -> list[str]:
    cmake = shutil.which("cmake")
    if not cmake:
        raise ToolsUnavailable("no cmake to build llama.cpp's tools (pip install cmake, or apt-get install cmake)")
    try:
        subprocess.run([cmake, "--version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise ToolsUnavailable(f"cmake does not run: {e}") from None
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not cxx or not shutil.which(cxx.split()[0]):
        raise ToolsUnavailable("no C++ compiler (c++, g++ or clang++) to build llama.cpp's tools")
    return [cmake]


def _clear_stale(parent: Path, prefix: str) -> None:
    """Temporary build folders of interrupted builds whose process is gone."""
    for tmp in parent.glob(f"{prefix}*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def build(tools: Iterable[str] = ("llama-server",), quiet: bool = False) -> Path:
    """The folder holding llama.cpp's `tools` (and the shared libraries they load), built once
    per llama-cpp-python version (with llama-server, llama-quantize and llama-imatrix) and then
    reused. Raises ToolsUnavailable when they cannot be built here."""
    wanted = tuple(dict.fromkeys([*TOOLS, *tools]))
    version = llama_cpp_python_version()
    final = cache_dir(version)
    if _have(final / "bin", tools):
        return final / "bin"
    (cmake,) = _check_toolchain()
    CACHE.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    _clear_stale(CACHE, prefix)
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=CACHE))
    work.chmod(0o755)
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        source = work / "source"
        env_source = os.environ.get("POCKETLM_LLAMA_CPP_SOURCE")
        if env_source:
            if not (Path(env_source) / "CMakeLists.txt").is_file():
                raise ToolsUnavailable(f"POCKETLM_LLAMA_CPP_SOURCE={env_source}: not a llama.cpp source tree")
            shutil.copytree(env_source, source, ignore=shutil.ignore_patterns("build", ".git"))
        elif source_tree(version):  # more tools than the cached build has: its source serves
            shutil.copytree(final / "source", source)
        else:
            say(f"llama_tools: downloading llama-cpp-python {version}'s sdist (about 75 MB) for llama.cpp's source")
            with tempfile.TemporaryDirectory(dir=work) as download:
                unpack_vendored(download_sdist(version, Path(download)), source)
        jobs = str(os.cpu_count() or 2)
        say(
            f"llama_tools: building {', '.join(wanted)} from llama.cpp in llama-cpp-python {version} "
            f"(about {BUILD_MINUTES} minutes on 2 cores, once: cached in {final}); log in {work / 'build.log'}"
        )
        started = time.monotonic()
        with open(work / "build.log", "w") as log:
            for cmd in (
                [cmake, "-S", str(source), "-B", str(work / "build"), *CMAKE_FLAGS],
                [cmake, "--build", str(work / "build"), "--target", *wanted, "-j", jobs],
            ):
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode:
                    tail = "\n".join((work / "build.log").read_text(errors="replace").splitlines()[-15:])
                    raise ToolsUnavailable(f"`{' '.join(cmd)}` failed:\n{tail}")
        built = work / "build" / "bin"
        if not _have(built, wanted):
            raise ToolsUnavailable(f"the build has no {', '.join(t for t in wanted if not _have(built, [t]))}")
        (work / "bin").mkdir()
        for item in built.iterdir():  # the tools and their shared libraries (.so files and their links)
            if item.name in wanted or ".so" in item.name or ".dylib" in item.name:
                shutil.copy2(item, work / "bin" / item.name, follow_symlinks=False)
        minutes = round((time.monotonic() - started) / 60, 1)
        info = {"version": version, "tools": list(wanted), "cmake_flags": list(CMAKE_FLAGS), "minutes": minutes}
        (work / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(work / "build")
        old = None
        if final.exists():  # an older build with fewer tools: swap it out
            old = final.with_name(f"{prefix}{os.getpid()}-old")
            os.replace(final, old)
        try:
            os.replace(work, final)
        except OSError:  # another process finished first
            if not _have(final / "bin", tools):
                raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
        say(f"llama_tools: built in {minutes} min: {final / 'bin'}")
        return final / "bin"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_info(bin_dir: Path) -> dict[str, object]:
    """What build.json says of the build holding `bin_dir`."""
    path = bin_dir.parent / "build.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> int:
    tools = sys.argv[1:] or list(TOOLS)
    try:
        print(build(tools))
    except ToolsUnavailable as e:
        print(f"llama_tools: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
