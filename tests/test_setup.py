"""
Tests of the set-up as documented: the README's Quick start commands (as
C{.ci/readme.py} extracts them for CI), the supported Python versions
(setup.cfg, as C{noxfile.py} reads them) and the packaging files.  Reads
files only; running the commands is C{.ci/run}'s job (it needs root, the
distribution's Python and the mediator's default ports).
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
SKIP = None if (ROOT / ".ci" / "readme.py").exists() and (ROOT / "setup.cfg").exists() else "not a source checkout"


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ReadmeCommandTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def setUp(self) -> None:
        self.readme = load(ROOT / ".ci" / "readme.py", "_natbypass_ci_readme")
        self.commands = self.readme.commands((ROOT / "README.md").read_text())

    def test_setup_command(self) -> None:
        """One line: a venv from python3 (python3-venv from apt when missing), the install, the mediator."""
        command = self.commands["setup"]
        self.assertTrue(command.startswith("python3 -c 'import ensurepip' 2>/dev/null || "), command)
        self.assertIn("apt-get install -y -qq python3-venv", command)
        self.assertIn("python3 -m venv .venv", command)
        self.assertTrue(command.endswith("&& .venv/bin/pip install . && .venv/bin/twistd -n natbypass-mediator"))
        self.assertNotIn("python3 -m pip install", command)  # PEP 668: not into the distribution's Python

    def test_tests_command(self) -> None:
        command = self.commands["tests"]
        self.assertTrue(command.endswith("&& .venv/bin/pip install nox && .venv/bin/nox"), command)

    def test_extraction_is_strict(self) -> None:
        with self.assertRaises(SystemExit):
            self.readme.commands("# x\n\n## Quick start\n\n```sh\na\n```\n\n## Next\n")
        with self.assertRaises(SystemExit):
            self.readme.commands("# no quick start\n")


class SupportedVersionsTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def setUp(self) -> None:
        self.cfg = configparser.ConfigParser()
        self.cfg.read(ROOT / "setup.cfg")

    def test_classifiers_and_python_requires_agree(self) -> None:
        versions = re.findall(
            r"Programming Language :: Python :: (3\.\d+)\s*$", self.cfg["metadata"]["classifiers"], re.M
        )
        self.assertEqual(versions, ["3.11", "3.12", "3.13"])
        self.assertEqual(self.cfg["options"]["python_requires"].strip(), f">={versions[0]}")
        self.assertGreaterEqual(sys.version_info[:2], (3, 11))

    def test_manifest_and_build_system(self) -> None:
        manifest = (ROOT / "MANIFEST.in").read_text()
        for line in (
            "include twisted/plugins/natbypass_plugins.py",
            "include twisted/plugins/natbypass_endpoints.py",
            "graft docs",
            "graft tests",
            "global-exclude dropin.cache",
        ):
            self.assertIn(line, manifest)
        pyproject = (ROOT / "pyproject.toml").read_text()
        self.assertIn('build-backend = "setuptools.build_meta"', pyproject)
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())
