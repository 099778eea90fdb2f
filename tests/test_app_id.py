"""Tests of C{natbypass id}: prints the fingerprint, creates the key 0600, refuses unusable key files."""

from __future__ import annotations

import io
import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from natbypass.app import cli
from natbypass.app import id as id_command
from natbypass.identity import Fingerprint, Identity, write_identity


class IdCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.path = os.path.join(self.dir, "sub", "identity.pem")

    def run_id(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = id_command.run(list(argv), out, err)
        return code, out.getvalue(), err.getvalue()

    def test_creates_key_and_prints_fingerprint(self) -> None:
        code, out, err = self.run_id("--identity", self.path)
        self.assertEqual(code, 0)
        fingerprint = Fingerprint.parse(out.strip())
        self.assertEqual(str(fingerprint), out.strip())
        self.assertIn("created a new identity key", err)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        again = self.run_id("--identity", self.path)
        self.assertEqual(again, (0, out, ""))  # the same key, not a new one

    def test_existing_key(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        identity = Identity.generate()
        write_identity(self.path, identity)
        code, out, _ = self.run_id("--identity", self.path, "--json")
        self.assertEqual(code, 0)
        self.assertEqual(
            json.loads(out), {"fingerprint": str(identity.fingerprint), "path": self.path, "created": False}
        )

    def test_json_when_created(self) -> None:
        code, out, _ = self.run_id("--identity", self.path, "--json")
        self.assertEqual((code, json.loads(out)["created"]), (0, True))

    def test_insecure_key_refused(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        write_identity(self.path, Identity.generate())
        os.chmod(self.path, 0o644)
        code, out, err = self.run_id("--identity", self.path)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("chmod 600", err)

    def test_not_a_key(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"not a key\n")
        os.close(fd)
        code, _, err = self.run_id("--identity", self.path)
        self.assertEqual(code, 1)
        self.assertIn(self.path, err)

    def test_bad_usage(self) -> None:
        with self.assertRaises(SystemExit) as cm:
            id_command.parse_options(["--nope"])
        self.assertEqual(cm.exception.code, 2)

    def test_default_path_from_environment(self) -> None:
        """Without --identity the key lives under $XDG_CONFIG_HOME."""
        old = os.environ.get("XDG_CONFIG_HOME")
        os.environ["XDG_CONFIG_HOME"] = os.path.abspath(self.dir)
        self.addCleanup(
            lambda: os.environ.pop("XDG_CONFIG_HOME") if old is None else os.environ.update(XDG_CONFIG_HOME=old)
        )
        code, out, _ = self.run_id()
        self.assertEqual(code, 0)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "natbypass", "identity.pem")))

    def test_dispatcher_entry(self) -> None:
        self.assertEqual(cli.SUBCOMMANDS["id"][0], "natbypass.app.id")
        self.assertIn("  id ", cli.USAGE)
