"""
Checks a built sdist and wheel, then installs the wheel into a clean venv.

    python .ci/check_dist.py SDIST WHEEL VENV-DIR

- the sdist carries the twistd plugin file, the docs, the tests and the CI
  scripts; neither archive carries a plugin cache (C{dropin.cache}) or an
  C{__init__.py} for C{twisted}/C{twisted.plugins} (which would shadow
  Twisted's own packages);
- the wheel holds no module that the sdist does not (no stale C{build/} debris);
- in a clean venv made with this Python, C{twistd --help} lists both plugins,
  which leaves a plugin cache that names them and that the next lookup keeps
  (no rescan at every start), and C{natbypass mediator --help} shows the
  plugin's options.

Exit status 0 when all hold; otherwise each failure is printed and the status is 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PLUGIN = "twisted/plugins/natbypass_plugins.py"
ENDPOINT_PLUGIN = "twisted/plugins/natbypass_endpoints.py"


def check(sdist: Path, wheel: Path, venv: Path) -> list[str]:
    problems: list[str] = []
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        src = {n[len(top) + 1 :] for n in tar.getnames() if n.startswith(top + "/")}
    with zipfile.ZipFile(wheel) as whl:
        built = set(whl.namelist())
    for needed in (
        PLUGIN,
        ENDPOINT_PLUGIN,
        "README.md",
        "MANIFEST.in",
        "noxfile.py",
        "docs/protocol.md",
        "tests/__init__.py",
        "tests/test_cli.py",
        ".ci/test",
        "natbypass/app/run.py",
    ):
        if needed not in src:
            problems.append(f"sdist lacks {needed}")
    if not any(n.startswith("docs/") for n in src) or sum(n.startswith("tests/test_") for n in src) < 10:
        problems.append("sdist lacks docs/ or tests/")
    for name, members in (("sdist", src), ("wheel", built)):
        if any(m.endswith("dropin.cache") for m in members):
            problems.append(f"{name} carries a plugin cache (dropin.cache)")
        for bad in ("twisted/__init__.py", "twisted/plugins/__init__.py"):
            if bad in members:
                problems.append(f"{name} carries {bad}")
    for plugin in (PLUGIN, ENDPOINT_PLUGIN):
        if plugin not in built:
            problems.append(f"wheel lacks {plugin}")
    stale = sorted(m for m in built if m.endswith(".py") and m not in src)
    if stale:
        problems.append(f"wheel holds modules the sdist does not (stale build/?): {stale}")
    if problems:
        return problems

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    run = dict(cwd="/", env=env, capture_output=True, text=True, timeout=120)  # not the source tree
    helped = subprocess.run([str(venv / "bin" / "twistd"), "--help"], **run)
    for plugin in ("natbypass-mediator", "natbypass-peer"):
        if plugin not in helped.stdout:
            problems.append(
                f"twistd --help in a clean venv does not list {plugin}: {helped.stdout[-2000:]}{helped.stderr[-2000:]}"
            )
    caches = list((venv / "lib").glob("python3*/site-packages/twisted/plugins/dropin.cache"))
    if len(caches) != 1:
        problems.append(f"no plugin cache next to the installed plugin: {caches}")
    else:
        before = caches[0].stat().st_mtime_ns
        listed = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import twisted.plugins as p; from twisted.plugin import getCache; print(sorted(getCache(p)))",
            ],
            **run,
        )
        for name in ("natbypass_plugins", "natbypass_endpoints"):
            if name not in listed.stdout:
                problems.append(f"the plugin cache does not name {name}: {listed.stdout}{listed.stderr}")
        if caches[0].stat().st_mtime_ns != before:
            problems.append("the plugin cache was rewritten by a second lookup (stale after twistd --help)")
    mediator = subprocess.run([str(venv / "bin" / "natbypass"), "mediator", "--help"], **run)
    if mediator.returncode != 0 or "--stun-alternate" not in mediator.stdout:
        problems.append(
            f"natbypass mediator --help: {mediator.returncode} {mediator.stdout[-1000:]}{mediator.stderr[-1000:]}"
        )
    return problems


def main(argv: list[str]) -> int:
    sdist, wheel, venv = (Path(a) for a in argv)
    problems = check(sdist, wheel, venv)
    for p in problems:
        print(f"check_dist: {p}", file=sys.stderr)
    if not problems:
        print(f"check_dist: {sdist.name} and {wheel.name} are complete; twistd in a clean venv lists both plugins")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
