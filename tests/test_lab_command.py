"""
Tests for C{natbypass lab}: argument handling everywhere, and one real
up / show / exec / probe / down cycle when the lab can run here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import command
from natbypass.lab.lab import running_labs
from natbypass.lab.netns import lab_netns, missing_requirements, python_env

SKIP = missing_requirements()


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = command.run(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


class ArgumentTests(SynchronousTestCase):
    def test_presets(self) -> None:
        code, out, _ = run("presets")
        self.assertEqual(code, 0)
        for name in (
            "full-cone",
            "restricted-cone",
            "port-restricted-cone",
            "symmetric-random",
            "symmetric-predictable",
            "open",
            "firewall",
        ):
            self.assertIn(name, out)

    def test_usage_errors(self) -> None:
        self.assertEqual(run()[0], 2)
        self.assertEqual(run("sideways")[0], 2)
        code, _, err = run("down", "--all", "--stale")
        self.assertEqual(code, 2)
        self.assertIn("not allowed with", err)

    def test_bad_spec_is_reported(self) -> None:
        if SKIP:
            raise self.skipTest(SKIP)
        code, _, err = run("up", "a=warp-drive")
        self.assertEqual(code, 1)
        self.assertIn("unknown preset 'warp-drive'", err)

    def test_dispatch_from_natbypass_command(self) -> None:
        """C{natbypass lab} reaches this module through the CLI dispatcher."""
        r = subprocess.run(
            [sys.executable, "-m", "natbypass", "lab", "presets"], capture_output=True, text=True, env=python_env()
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("symmetric-predictable", r.stdout)


class CycleTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def test_up_show_exec_probe_down(self) -> None:
        code, out, err = run("up", '{"sites": {"a": "restricted-cone", "b": "open"}}', "--json")
        self.assertEqual(code, 0, err)
        info = json.loads(out)
        lab_id = info["lab_id"]
        self.addCleanup(run, "down", lab_id)
        self.assertEqual(running_labs()[lab_id]["owner_pid"], None)  # persistent
        nodes = {n["node"]: n for n in info["nodes"]}
        self.assertEqual(nodes["a.1"]["address"], "10.1.0.2")
        self.assertEqual(nodes["b.1"]["public"], "198.18.1.2")

        code, out, _ = run("show", "--lab", lab_id, "--json")
        self.assertEqual(json.loads(out)["nodes"], info["nodes"])

        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "natbypass",
                "lab",
                "exec",
                "--lab",
                lab_id,
                "a",
                "--",
                "ip",
                "-4",
                "-o",
                "addr",
                "show",
                "eth0",
            ],
            capture_output=True,
            text=True,
            env=python_env(),
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("10.1.0.2/24", r.stdout)
        self.assertEqual(run("exec", "--lab", lab_id, "a", "--", "false")[0], 1)

        code, out, err = run("probe", "--lab", lab_id, "--json", "a")
        self.assertEqual(code, 0, err)
        got = json.loads(out)["a"]
        self.assertEqual(
            (got["udp_mapping"], got["filtering"], got["public_ip"]),
            ("endpoint-independent", "address-dependent", "198.18.1.1"),
        )

        code, out, _ = run("down", lab_id)
        self.assertEqual(code, 0)
        self.assertEqual(lab_netns(lab_id), {})
        self.assertNotIn(lab_id, running_labs())
        self.assertIn("no lab", run("down", lab_id)[2])
