"""The hot-path modules compiled to C extensions with mypyc, and the build that makes them.

Every INVITE, response, ACK and BYE runs through the SIP parser and the proxy core, and every
initial INVITE through the policy rules. Those modules are plain, strictly typed Python; mypyc (part of mypy) compiles them to C extension
modules next to their sources, which runs the same code in about half the time. Nothing else
changes: without a C compiler the build is skipped and sipguard runs the very same modules as
Python (slower, but identical in behaviour).

    python -m sipguard.native build    # compile HOT_MODULES in place
    python -m sipguard.native ensure   # the same, only when a source is newer (what `make` runs)
    python -m sipguard.native status   # which modules run compiled, and any stale ones
    python -m sipguard.native clean    # remove the compiled modules

A compiled module shadows its ``.py`` file, so an edited source with an old build would run the
old code: :func:`status` reports such modules as stale, ``sipguard run`` logs a warning for
them, and ``make run`` / ``make test`` rebuild whenever a hot source changes.

A compiled class is a native class: its attributes are the declared ones, its methods cannot
be patched, and Python code cannot subclass it. pydantic models cannot be native classes, so
each rule's settings live in a ``policy/<rule>_settings.py`` module that is not in the list
and stays Python (the rule reads them as ordinary objects).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUP = "sipguard._native"  # the shared library that holds all compiled modules

# The per-message path: parser, grammars, proxy core, timers, expiry wheel, verdicts; and the
# per-INVITE policy: the pipeline, every rule, their windows, leases and number lookups (with
# them, the build takes about twice as long: ~2 min instead of ~70 s on 2 CPUs). Not here:
# the rules' pydantic settings (policy/*_settings.py, schema.py), certificate parsing
# (stircert.py: cryptography does the work, once per certificate) and policy/state.py.
# passport.py is here: every call that carries Identity decodes a PASSporT.
HOT_MODULES: tuple[str, ...] = (
    "sipguard.sip.errors",
    "sipguard.sip.params",
    "sipguard.sip.uri",
    "sipguard.sip.nameaddr",
    "sipguard.sip.via",
    "sipguard.sip.history_info",
    "sipguard.sip.identity",
    "sipguard.sip.message",
    "sipguard.sip.parser",
    "sipguard.contract",
    "sipguard.proxy.timers",
    "sipguard.proxy.settings",
    "sipguard.proxy.build",
    "sipguard.proxy.transactions",
    "sipguard.proxy.dialogs",
    "sipguard.proxy.routing",
    "sipguard.proxy.keepalive",
    "sipguard.proxy.core",
    "sipguard.edge",
    "sipguard.state.expiry",
    "sipguard.state.memory",
    "sipguard.policy.windows",
    "sipguard.policy.numbers",
    "sipguard.policy.peers",
    "sipguard.policy.suspensions",
    "sipguard.policy.pipeline",
    "sipguard.policy.callerid",
    "sipguard.policy.concurrency",
    "sipguard.policy.rate",
    "sipguard.policy.dialer_state",
    "sipguard.policy.dialer",
    "sipguard.policy.flood",
    "sipguard.policy.passport",
    "sipguard.policy.identity",
    "sipguard.policy.national_cli",
    "sipguard.policy.engine",
    "sipguard.verify_threads",
    "sipguard.transport.udp",
    "sipguard.ops.calllog",
    "sipguard.ops.observe",
    "sipguard.server",
)


# Hand-written C extensions, built with the mypyc modules: module -> its C source.
C_MODULES: dict[str, str] = {
    "sipguard.sip._scan": "sipguard/sip/_scan.c",  # the parser's fast path (sip/parser.py)
    # the usual URI, name-addr and via-parm (sip/uri.py, nameaddr.py, via.py)
    "sipguard.sip._grammar": "sipguard/sip/_grammar.c",
    # ES256 checks on threads without the GIL (verify_threads.py), against the system libcrypto
    "sipguard._es256": "sipguard/_es256.c",
    # UDP sends on a thread without the GIL, in order, with sendmmsg (transport/udp.py)
    "sipguard.transport._udp_send": "sipguard/transport/_udp_send.c",
    # the per-call log lines' fields as JSON text in one pass (ops/calllog.py)
    "sipguard.ops._jsonline": "sipguard/ops/_jsonline.c",
    # limit counters shared by the workers of one host in shared memory (state/shared_memory.py)
    "sipguard.state._shm": "sipguard/state/_shm.c",
}
# pthread: for a glibc older than 2.34, where the process-shared mutex is not in libc
C_LIBRARIES: dict[str, list[str]] = {"sipguard._es256": ["crypto"],
                                     "sipguard.state._shm": ["pthread"]}


def _source(module: str) -> Path:
    if module in C_MODULES:
        return ROOT / C_MODULES[module]
    return ROOT / (module.replace(".", "/") + ".py")


def _ext_suffix() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _compiled_path(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + _ext_suffix())


def status() -> tuple[list[str], list[str]]:
    """(modules that run compiled, compiled modules older than their source)."""
    compiled: list[str] = []
    stale: list[str] = []
    for name in (*HOT_MODULES, *C_MODULES):
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
        except ImportError:  # a C extension not built: its Python counterpart runs
            continue
        path = getattr(module, "__file__", None) or ""
        if path.endswith(".py"):
            continue
        compiled.append(name)
        try:
            if _source(name).stat().st_mtime > Path(path).stat().st_mtime:
                stale.append(name)
        except OSError:
            pass
    return compiled, stale


# What the last build was made for: the interpreter's version and installation. A build is
# tied to the CPython it was compiled against; another one (a venv made again from another
# python3) gets its own build.
BUILT_FOR = ROOT / "sipguard" / ".native-built-for"


def interpreter() -> str:
    """The running interpreter, as :data:`BUILT_FOR` records it."""
    return f"{sys.version.split()[0]} {sys.base_prefix}"


def needs_build() -> bool:
    """True when a compiled module is missing or older than its source (or this file), or the
    build was made for another interpreter."""
    try:
        if BUILT_FOR.read_text().strip() != interpreter():
            return True
    except OSError:
        return True
    own = Path(__file__).stat().st_mtime
    for name in (*HOT_MODULES, *C_MODULES):
        target = _compiled_path(name)
        if not target.exists():
            return True
        built = target.stat().st_mtime
        if _source(name).stat().st_mtime > built or own > built:
            return True
    return False


def clean() -> None:
    suffix = _ext_suffix()
    for name in (*HOT_MODULES, *C_MODULES, GROUP + "__mypyc"):
        path = ROOT / (name.replace(".", "/") + suffix)
        path.unlink(missing_ok=True)
    BUILT_FOR.unlink(missing_ok=True)


def build() -> int:
    """Compile HOT_MODULES in place; 0 on success. On failure nothing compiled is left."""
    try:
        importlib.import_module("setuptools")  # mypyc builds through setuptools
        importlib.import_module("mypyc.build")
    except ImportError as exc:
        print(f"sipguard.native: not compiled ({exc.name} missing): running as Python")
        return 1
    clean()
    paths = [str(_source(m).relative_to(ROOT)) for m in HOT_MODULES]
    script = (
        "import sys\n"
        "from setuptools import setup\n"
        "from setuptools import Extension\n"
        "from mypyc.build import mypycify\n"
        f"setup(name='sipguard-native', ext_modules=mypycify({paths!r}, "
        f"group_name={GROUP!r}, opt_level='3', verbose=False) + "
        f"[Extension(name, [src], extra_compile_args=['-O3'], "
        f"libraries={C_LIBRARIES!r}.get(name, [])) for name, src in "
        f"{sorted(C_MODULES.items())!r}], "
        "script_args=['-q', 'build_ext', '--inplace', '--build-temp', sys.argv[1], "
        "'--build-lib', sys.argv[1]])\n"
    )
    tmp = tempfile.mkdtemp(prefix="sipguard-native-")
    try:
        env = dict(os.environ, MYPY_CACHE_DIR=os.path.join(tmp, "mypy_cache"))
        result = subprocess.run(
            [sys.executable, "-c", script, tmp], cwd=ROOT, env=env, capture_output=True,
            text=True,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    if result.returncode != 0:
        clean()
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        print("sipguard.native: compiling failed, running as Python:", *tail, sep="\n  ")
        return 1
    BUILT_FOR.write_text(interpreter() + "\n")
    print(f"sipguard.native: {len(HOT_MODULES)} hot-path modules compiled with mypyc, "
          f"{len(C_MODULES)} C extension(s) built")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "status"
    if command == "build":
        return build()
    if command == "ensure":  # build only when needed (make run / make test)
        return build() if needs_build() else 0
    if command == "clean":
        clean()
        return 0
    if command == "status":
        compiled, stale = status()
        print(f"compiled: {len(compiled)} of {len(HOT_MODULES) + len(C_MODULES)} hot-path "
              "modules (mypyc and C)")
        for name in stale:
            print(f"stale (source newer than the build, run `make`): {name}")
        print(f"interpreter: Python {interpreter()}")
        return 1 if stale else 0
    print("usage: python -m sipguard.native [build|ensure|status|clean]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
