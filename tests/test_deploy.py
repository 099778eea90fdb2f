"""
Static checks of the deployment files: the C{Dockerfile}, C{deploy/compose.yaml},
C{deploy/natbypass-mediator.service}, C{docs/deploy-gcp.md} and the image's
health check (C{deploy/healthcheck.py}).  They read files only and run
anywhere; building and running the image is C{.ci/docker_check.sh}'s job
(root, dockerd).  The commands the files give the mediator and the peer are
parsed by the plugins' own C{Options}, so an option renamed in the code fails
here, not in production.
"""

from __future__ import annotations

import importlib.util
import io
import ipaddress
import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app.run import command_options

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SKIP = None if (DEPLOY / "compose.yaml").exists() and (ROOT / "Dockerfile").exists() else "not a source checkout"

try:
    import yaml
except ImportError:  # PyYAML is not a test dependency
    yaml = None


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def options(name: str, argv: list[str]) -> usage.Options:
    """C{argv} parsed by the options of C{natbypass NAME} (a usage error fails the test)."""
    parsed = command_options(name, io.StringIO())
    parsed.parseOptions(argv)
    return parsed


def mediator_defaults() -> dict[str, Any]:
    return dict(options("mediator", []))


def port_of(host_port: str) -> int:
    return int(host_port.rsplit(":", 1)[1])


def open_files_needed(opts: dict[str, Any]) -> int:
    """Descriptors the mediator wants at its caps: signalling, STUN/TCP, the reserve."""
    return opts["max-connections"] + (opts["stun-tcp-max"] or 1000) + opts["fd-reserve"]


# ------------------------------------------------------------- small parsers


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, backslash continuations joined."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current.strip():
        logical.append(current.strip())
    result = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def exec_form(arguments: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def unit_file(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit's sections: every C{Key=Value} in order (keys repeat), continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    section = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            sections.setdefault(section, [])
            continue
        if section is None or "=" not in line:
            raise ValueError(f"not a unit file line: {line!r}")
        key, _, value = line.partition("=")
        sections[section].append((key.strip(), value.strip()))
    return sections


def unit_value(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    """The effective value: the last assignment (systemd's rule for single-valued keys)."""
    values = [v for k, v in sections.get(section, []) if k == key]
    return values[-1] if values else None


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(text: str, environ: dict[str, str]) -> str:
    """Compose's C{${VAR}}, C{${VAR-default}} (default when unset) and C{${VAR:-default}} (also when empty)."""

    def value(match: re.Match[str]) -> str:
        name, kind, default = match.group(1), match.group(2), match.group(3) or ""
        if name in environ and (kind != ":-" or environ[name]):
            return environ[name]
        return default if kind else ""

    return _VARIABLE.sub(value, text)


def shell_commands(markdown: str) -> list[str]:
    """The commands of a document's C{sh} blocks, with backslash continuations joined."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```$", markdown, re.S | re.M):
        for command in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            if command.strip():
                commands.append(command.strip())
    return commands


def gcloud_flag(command: str, flag: str) -> str | None:
    """The value of C{--flag=VALUE} in a gcloud command line."""
    match = re.search(rf"(?:^|\s){re.escape(flag)}=(\S+)", command)
    return match.group(1) if match else None


def port_ranges(spec: str) -> dict[str, set[int]]:
    """C{udp:3478-3479,tcp:7443} -> {protocol: ports}."""
    result: dict[str, set[int]] = {}
    for item in spec.split(","):
        protocol, _, ports = item.partition(":")
        low, _, high = ports.partition("-")
        result.setdefault(protocol, set()).update(range(int(low), int(high or low) + 1))
    return result


# ------------------------------------------------------------ parser tests


class ParserTests(SynchronousTestCase):
    """The small parsers above, on examples and generated input."""

    def test_dockerfile_continuations_and_comments(self) -> None:
        text = 'FROM x\n# c\nRUN a \\\n    # inner comment\n && b\nCMD ["a", "b"]\n'
        self.assertEqual(dockerfile_instructions(text), [("FROM", "x"), ("RUN", "a  && b"), ("CMD", '["a", "b"]')])
        self.assertEqual(exec_form('["a", "b"]'), ["a", "b"])
        self.assertIsNone(exec_form("a b"))

    @given(st.lists(st.from_regex(r"[A-Za-z0-9_./-]{1,12}", fullmatch=True), min_size=1, max_size=6))
    def test_exec_form_round_trip(self, argv: list[str]) -> None:
        text = f"CMD {json.dumps(argv)}\n"
        [(keyword, arguments)] = dockerfile_instructions(text)
        self.assertEqual((keyword, exec_form(arguments)), ("CMD", argv))

    def test_unit_file(self) -> None:
        parsed = unit_file("# c\n[Service]\nA=1\nExecStart=/bin/x \\\n    --y 1\nA=2\n[Install]\nB=\n")
        self.assertEqual(parsed["Service"], [("A", "1"), ("ExecStart", "/bin/x --y 1"), ("A", "2")])
        self.assertEqual(unit_value(parsed, "Service", "A"), "2")
        self.assertEqual(unit_value(parsed, "Install", "B"), "")
        with self.assertRaises(ValueError):
            unit_file("A=1\n")

    @given(
        st.lists(
            st.tuples(
                st.from_regex(r"[A-Z][A-Za-z]{0,15}", fullmatch=True),
                st.from_regex(r"[a-z0-9@~:/ _.-]{0,20}", fullmatch=True).map(str.strip),
            ),
            max_size=10,
        )
    )
    def test_unit_file_round_trip(self, pairs: list[tuple[str, str]]) -> None:
        text = "[Service]\n" + "".join(f"{k}={v}\n" for k, v in pairs)
        self.assertEqual(unit_file(text), {"Service": pairs})

    def test_interpolate(self) -> None:
        env = {"SET": "x", "EMPTY": ""}
        self.assertEqual(interpolate("${SET}-${UNSET}", env), "x-")
        self.assertEqual(interpolate("${UNSET-d} ${EMPTY-d} ${EMPTY:-d} ${SET:-d}", env), "d  d x")

    @given(
        st.from_regex(r"[A-Z_]{1,8}", fullmatch=True),
        st.from_regex(r"[a-z0-9.:]{0,8}", fullmatch=True),
        st.one_of(st.none(), st.from_regex(r"[a-z0-9.]{0,8}", fullmatch=True)),
    )
    def test_interpolate_defaults(self, name: str, default: str, value: str | None) -> None:
        env = {} if value is None else {name: value}
        self.assertEqual(interpolate(f"<${{{name}-{default}}}>", env), f"<{default if value is None else value}>")
        self.assertEqual(interpolate(f"<${{{name}:-{default}}}>", env), f"<{value or default}>")

    def test_shell_commands(self) -> None:
        doc = "x\n```sh\na --b=1 \\\n    --c=2\nd\n```\n```\nnot sh\n```\n"
        self.assertEqual(shell_commands(doc), ["a --b=1 --c=2", "d"])
        self.assertEqual(gcloud_flag("a --b=1 --c=2", "--c"), "2")
        self.assertEqual(port_ranges("udp:3478-3479,tcp:7443"), {"udp": {3478, 3479}, "tcp": {7443}})


# ------------------------------------------------------------------ Dockerfile


class DockerfileTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def setUp(self) -> None:
        self.instructions = dockerfile_instructions((ROOT / "Dockerfile").read_text())

    def all(self, keyword: str) -> list[str]:
        return [args for k, args in self.instructions if k == keyword]

    def test_default_base_is_what_users_pull(self) -> None:
        """ARG BASE=python:3.11-slim before FROM ${BASE}: CI swaps the base, users get the default."""
        self.assertEqual(self.instructions[0], ("ARG", "BASE=python:3.11-slim"))
        self.assertEqual(self.all("FROM"), ["${BASE}"])

    def test_exec_form_entrypoint_runs_natbypass(self) -> None:
        """No shell in between: `natbypass` is PID 1 and gets SIGTERM; the CMD's options parse."""
        [entrypoint] = self.all("ENTRYPOINT")
        [cmd] = self.all("CMD")
        self.assertEqual(exec_form(entrypoint), ["natbypass"])
        argv = exec_form(cmd)
        assert argv is not None, cmd
        self.assertEqual(argv[0], "mediator")
        opts = options("mediator", argv[1:])
        exposed = set(" ".join(self.all("EXPOSE")).split())
        self.assertIn(f"{port_of(opts['stun'])}/udp", exposed)
        self.assertIn(f"{port_of(opts['stun'])}/tcp", exposed)
        self.assertIn(f"{opts['signal'].split(':')[1]}/tcp", exposed)

    def test_runs_as_a_non_root_user(self) -> None:
        users = self.all("USER")
        self.assertTrue(users, "no USER: the container would run as root")
        self.assertNotIn(users[-1].split(":")[0], ("root", "0"))
        run = " ".join(self.all("RUN"))
        self.assertIn("useradd --system --user-group --no-create-home --home-dir /nonexistent", run)

    def test_plugin_cache_built_and_checked(self) -> None:
        run = " ".join(self.all("RUN"))
        self.assertIn("getPlugins(IPlugin)", run)
        self.assertIn("twistd --help | grep -q natbypass-mediator", run)

    def test_healthcheck_is_the_installed_script(self) -> None:
        [check] = self.all("HEALTHCHECK")
        options_part, _, command = check.partition(" CMD ")
        argv = exec_form(command.strip())
        self.assertEqual(argv, ["/opt/natbypass/bin/python3", "/opt/natbypass/libexec/natbypass-healthcheck"])
        self.assertIn("deploy/healthcheck.py", " ".join(self.all("RUN")))
        self.assertIn("--interval=", options_part)


# ---------------------------------------------------------------- compose.yaml


class ComposeTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP
    elif yaml is None:
        skip = "PyYAML is not installed (pip install pyyaml): compose.yaml not parsed"

    def setUp(self) -> None:
        text = interpolate((DEPLOY / "compose.yaml").read_text(), {})
        self.compose = yaml.safe_load(text)
        self.services = self.compose["services"]
        self.dockerfile = dockerfile_instructions((ROOT / "Dockerfile").read_text())

    def test_services(self) -> None:
        """Redis, a mediator on it, a second one (profile cluster) and an example peer (profile peer)."""
        self.assertEqual(set(self.services), {"redis", "mediator", "mediator-b", "peer"})
        self.assertEqual(self.services["peer"]["profiles"], ["peer"])
        self.assertEqual(self.services["mediator-b"]["profiles"], ["cluster"])
        self.assertEqual(self.services["peer"]["depends_on"]["mediator"]["condition"], "service_healthy")
        for name in ("mediator", "mediator-b"):
            self.assertEqual(self.services[name]["depends_on"]["redis"]["condition"], "service_healthy", name)

    def test_mediators_share_redis(self) -> None:
        """Both mediators parse, name the compose Redis and differ only in host ports and state volume."""
        a, b = self.services["mediator"], self.services["mediator-b"]
        self.assertEqual(a["command"], b["command"])
        opts = options("mediator", a["command"][1:])
        self.assertEqual(opts["redis"], "redis://redis:6379/0")
        host_ports = [{e.split(":")[1] for e in s["ports"]} for s in (a, b)]
        self.assertFalse(host_ports[0] & host_ports[1], "the two mediators publish different host ports")
        self.assertEqual(
            [e.rsplit(":", 1)[1] for e in a["ports"]], [e.rsplit(":", 1)[1] for e in b["ports"]], "same container ports"
        )
        self.assertNotEqual(a["volumes"], b["volumes"])

    def test_redis(self) -> None:
        """Official image name, not published, data in a volume, health-checked, unprivileged, hardened."""
        redis = self.services["redis"]
        self.assertEqual(redis["image"], "redis:7")
        self.assertNotIn("ports", redis)
        self.assertIn("redis-data:/data", redis["volumes"])
        self.assertEqual(redis["command"][0], "redis-server")
        self.assertIn("--appendonly", redis["command"])
        self.assertIn("redis-cli ping", " ".join(redis["healthcheck"]["test"]))
        self.assertEqual(redis["user"], "redis")
        self.assertEqual(redis["restart"], "unless-stopped")
        self.assertEqual(redis["cap_drop"], ["ALL"])
        self.assertIn("no-new-privileges:true", redis["security_opt"])
        self.assertTrue(redis["read_only"])

    def test_mediator_command_and_ports(self) -> None:
        """The command parses; STUN UDP+TCP and signalling published, metrics only on the host's loopback."""
        mediator = self.services["mediator"]
        command = mediator["command"]
        self.assertEqual(command[0], "mediator")
        opts = options("mediator", command[1:])
        stun, signal = port_of(opts["stun"]), int(opts["signal"].split(":")[1])
        metrics = int(opts["metrics"].split(":")[1])
        self.assertEqual((stun, signal), (port_of(mediator_defaults()["stun"]), 7000))
        published = {}
        for entry in mediator["ports"]:
            *host, container = entry.split(":")
            published[container] = host
        self.assertEqual(published[f"{stun}/udp"], ["0.0.0.0", str(stun)])
        self.assertEqual(published[f"{stun}/tcp"], ["0.0.0.0", str(stun)])
        self.assertEqual(published[f"{signal}/tcp"], ["0.0.0.0", str(signal)])
        self.assertEqual(published[f"{metrics}/tcp"][0], "127.0.0.1")

    def test_peer_command(self) -> None:
        peer = self.services["peer"]
        self.assertEqual(peer["command"][0], "peer")
        opts = options("peer", peer["command"][1:])
        self.assertEqual(opts["mediator"], "tcp:mediator:7000")
        self.assertEqual(opts["identity"], "/var/lib/natbypass/identity.pem")
        self.assertIn("peer-identity:/var/lib/natbypass", peer["volumes"])

    def test_hardening_and_lifecycle(self) -> None:
        image_user = [a for k, a in self.dockerfile if k == "USER"][-1]
        for name, service in self.services.items():
            if name == "redis":
                continue  # test_redis
            self.assertEqual(service["user"], image_user, name)
            self.assertEqual(service["restart"], "unless-stopped", name)
            self.assertEqual(service["cap_drop"], ["ALL"], name)
            self.assertIn("no-new-privileges:true", service["security_opt"], name)
            self.assertTrue(service["read_only"], name)
            test = service["healthcheck"]["test"]
            self.assertEqual(test[0], "CMD", name)
            [dockerfile_check] = [a for k, a in self.dockerfile if k == "HEALTHCHECK"]
            self.assertEqual(test[1:], exec_form(dockerfile_check.partition(" CMD ")[2].strip()), name)
        mediator = self.services["mediator"]
        self.assertEqual(mediator["stop_signal"], "SIGTERM")
        nofile = mediator["ulimits"]["nofile"]
        self.assertGreaterEqual(nofile["soft"], open_files_needed(mediator_defaults()))


# ---------------------------------------------------------------- systemd unit


class UnitFileTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def setUp(self) -> None:
        self.unit = unit_file((DEPLOY / "natbypass-mediator.service").read_text())

    def value(self, key: str) -> str | None:
        return unit_value(self.unit, "Service", key)

    def test_exec_start_parses(self) -> None:
        """ExecStart runs `natbypass mediator` with options the mediator accepts; metrics on loopback."""
        argv = shlex.split(self.value("ExecStart") or "")
        self.assertEqual(argv[:2], ["/opt/natbypass/bin/natbypass", "mediator"])
        opts = options("mediator", argv[2:])
        self.assertTrue(opts["metrics"].endswith(":interface=127.0.0.1"), opts["metrics"])
        ports = [port_of(opts["stun"]), int(opts["signal"].split(":")[1])]
        # No capability: every port is above 1023.
        self.assertTrue(all(p >= 1024 for p in ports), ports)
        self.assertEqual(self.value("CapabilityBoundingSet"), "")
        self.assertEqual(self.value("AmbientCapabilities"), "")

    def test_sandboxing(self) -> None:
        expected = {
            "DynamicUser": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "NoNewPrivileges": "yes",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
            "StateDirectory": "natbypass",
            "Restart": "on-failure",
            "KillSignal": "SIGTERM",
        }
        for key, value in expected.items():
            self.assertEqual(self.value(key), value, key)
        filters = [v for k, v in self.unit["Service"] if k == "SystemCallFilter"]
        self.assertEqual(filters[0], "@system-service")
        self.assertRegex(self.value("MemoryMax") or "", r"^\d+[KMG]$")

    def test_open_files_fit_the_connection_caps(self) -> None:
        argv = shlex.split(self.value("ExecStart") or "")
        needed = open_files_needed(dict(options("mediator", argv[2:])))
        self.assertGreaterEqual(int(self.value("LimitNOFILE") or 0), needed)

    def test_install(self) -> None:
        self.assertEqual(unit_value(self.unit, "Install", "WantedBy"), "multi-user.target")


# -------------------------------------------------------------- deploy-gcp.md


class GcpGuideTests(SynchronousTestCase):
    """The gcloud commands open the ports the mediator's command in the guide uses, and no others."""

    if SKIP:
        skip = SKIP

    def setUp(self) -> None:
        self.text = (ROOT / "docs" / "deploy-gcp.md").read_text()
        self.commands = shell_commands(self.text)

    def mediator_argv(self) -> list[str]:
        [line] = [c for c in self.commands if "'ExecStart=/opt/natbypass/bin/natbypass mediator" in c]
        command = line.rsplit("'ExecStart=", 1)[1].split("'", 1)[0]
        return shlex.split(command)[2:]

    def test_says_it_was_not_run(self) -> None:
        self.assertIn("checked against Google's published gcloud reference", self.text)
        self.assertIn("they have not been run", self.text)
        self.assertIn("--stun-advertise", self.text)

    def test_firewall_matches_the_mediator(self) -> None:
        argv = self.mediator_argv()
        stun = argv[argv.index("--stun") + 1]
        alternate = argv[argv.index("--stun-alternate") + 1]
        signal = argv[argv.index("--signal") + 1]
        stun_ports = {port_of(stun), port_of(alternate)}
        # The guide keeps the defaults: 3478 and the alternate default of port + 1.
        self.assertEqual(stun_ports, {port_of(mediator_defaults()["stun"]), port_of(mediator_defaults()["stun"]) + 1})
        allowed: dict[str, set[int]] = {}
        for command in self.commands:
            if command.startswith("gcloud compute firewall-rules create"):
                self.assertEqual(gcloud_flag(command, "--direction"), "INGRESS")
                self.assertEqual(gcloud_flag(command, "--target-tags"), "natbypass")
                for protocol, ports in port_ranges(gcloud_flag(command, "--rules") or "").items():
                    allowed.setdefault(protocol, set()).update(ports)
        signal_port = int(signal.split(":")[1])
        self.assertEqual(allowed["udp"], stun_ports)
        self.assertEqual(allowed["tcp"], stun_ports | {signal_port, 80})  # 80: certbot's HTTP-01
        metrics = argv[argv.index("--metrics") + 1]
        self.assertNotIn(int(metrics.split(":")[1]), allowed["tcp"])

    def test_forwarding_rules_carry_the_allowed_ports(self) -> None:
        forwarded: dict[tuple[str, str], set[int]] = {}
        for command in self.commands:
            if command.startswith("gcloud compute forwarding-rules create"):
                key = (gcloud_flag(command, "--address") or "", (gcloud_flag(command, "--ip-protocol") or "").lower())
                self.assertNotIn(key, forwarded, "overlapping rules on one address and protocol")
                low, _, high = (gcloud_flag(command, "--ports") or "").partition("-")
                forwarded[key] = set(range(int(low), int(high or low) + 1))
                self.assertEqual(gcloud_flag(command, "--target-instance"), "natbypass-target")
        for address in ("natbypass-ip1", "natbypass-ip2"):
            for protocol in ("udp", "tcp"):
                self.assertTrue({3478, 3479} <= forwarded[(address, protocol)], (address, protocol))
        self.assertTrue({80, 7443} <= forwarded[("natbypass-ip1", "tcp")])

    def test_commands_are_gcloud_compute_verbs_that_were_checked(self) -> None:
        checked = {
            "addresses create",
            "addresses describe",
            "addresses delete",
            "instances create",
            "instances delete",
            "target-instances create",
            "target-instances delete",
            "forwarding-rules create",
            "forwarding-rules delete",
            "firewall-rules create",
            "firewall-rules delete",
            "ssh",
            "scp",
        }
        used = set()
        for command in self.commands:
            match = re.match(r"^(?:\w+=\$\()?gcloud compute ([\w-]+(?: [\w-]+)?)", command)
            if match:
                verb = match.group(1)
                used.add(verb if verb.split()[0] not in ("ssh", "scp") else verb.split()[0])
        self.assertEqual(used - checked, set())
        self.assertIn("forwarding-rules create", used)


# ----------------------------------------------------------- the health check


class HealthcheckTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def setUp(self) -> None:
        self.hc = load(DEPLOY / "healthcheck.py", "_natbypass_deploy_healthcheck")

    def test_targets(self) -> None:
        target = self.hc.target
        self.assertEqual(target("tcp:9100"), self.hc.Target("127.0.0.1", 9100))
        self.assertEqual(target("tcp:9100:interface=10.0.0.5"), self.hc.Target("10.0.0.5", 9100))
        self.assertEqual(target("tcp:port=9100:interface=0.0.0.0"), self.hc.Target("127.0.0.1", 9100))
        self.assertEqual(target("tcp6:9100"), self.hc.Target("::1", 9100))
        self.assertEqual(target(r"tcp6:9100:interface=\:\:1"), self.hc.Target("::1", 9100))
        self.assertEqual(target("ssl:9100:privateKey=k.pem"), self.hc.Target("127.0.0.1", 9100, tls=True))
        self.assertEqual(target("unix:/run/m.sock"), self.hc.Target(path="/run/m.sock"))
        for bad in ("tcp:x", "tcp:0", "tcp:70000", "systemd:domain=INET:index=0", "unix:"):
            with self.assertRaises(self.hc.EndpointError, msg=bad):
                target(bad)

    @given(
        st.integers(1, 65535),
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
        st.booleans(),
    )
    def test_target_round_trip(self, port: int, interface: str, keyword_port: bool) -> None:
        """Any port and interface, written as Twisted quotes them, is where the check connects."""
        escaped = interface.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
        kind = "tcp6" if ipaddress.ip_address(interface).version == 6 else "tcp"
        port_part = f"port={port}" if keyword_port else str(port)
        expected = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(interface, interface)
        self.assertEqual(self.hc.target(f"{kind}:{port_part}:interface={escaped}"), self.hc.Target(expected, port))

    @given(st.lists(st.text(max_size=12), min_size=1, max_size=5))
    def test_split_endpoint_round_trip(self, fields: list[str]) -> None:
        """Positional fields with any characters, backslash-quoted, come back as they were."""
        quoted = [f.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=") for f in fields]
        self.assertEqual(self.hc.split_endpoint(":".join(quoted)), (fields, {}))

    def test_metrics_option(self) -> None:
        m = self.hc.metrics_option
        self.assertEqual(m(["natbypass", "mediator", "--metrics", "tcp:9100"]), "tcp:9100")
        self.assertEqual(m(["x", "--metrics=tcp:1", "--metrics", "tcp:2"]), "tcp:2")
        self.assertIsNone(m(["natbypass", "mediator", "--metrics"]))

    def fake_proc(self, processes: dict[int, list[str]]) -> Path:
        proc = Path(self.mktemp())
        for pid, argv in processes.items():
            (proc / str(pid)).mkdir(parents=True)
            (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (proc / "self").mkdir()
        return proc

    def test_finds_the_natbypass_process(self) -> None:
        proc = self.fake_proc(
            {
                7: ["/usr/bin/tini", "--", "natbypass", "peer"],
                1: ["/opt/natbypass/bin/python3", "/opt/natbypass/bin/natbypass", "mediator", "--metrics", "tcp:9"],
                30: ["sh"],
            }
        )
        lines = list(self.hc.command_lines(proc))
        self.assertEqual(lines[0][2], "mediator")  # PID 1 first
        self.assertEqual(self.hc.metrics_option(self.hc.find_natbypass(lines)), "tcp:9")
        self.assertIsNone(self.hc.find_natbypass([["sh", "-c", "natbypass"], ["python3", "x.py"]]))
        twistd = ["/usr/bin/python3", "/usr/bin/twistd", "-n", "natbypass-mediator"]
        self.assertEqual(self.hc.find_natbypass([twistd]), twistd)
