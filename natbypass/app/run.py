"""
C{natbypass mediator} and C{natbypass peer}: a twistd plugin's service, run
in the foreground by the C{natbypass} command.

    natbypass mediator [options]   runs what   twistd -n --pidfile= natbypass-mediator [options]
    natbypass peer [options]       runs what   twistd -n --pidfile= natbypass-peer [options]

The options are the plugin's own C{usage.Options} and the service comes from
the plugin's C{makeService} (the modules that the C{ServiceMaker} lines in
C{twisted/plugins/natbypass_plugins.py} name), so the two front ends cannot
drift apart.  This is for environments that expose only the C{natbypass}
script (C{pipx}); the twistd plugins stay the primary interface, and twistd's
own options (daemonising, pid file, log file, uid) are twistd's alone.

The log goes to stdout, as with C{twistd -n}.  SIGINT (Ctrl-C) and SIGTERM stop
the reactor, which stops the service first (the same shutdown as twistd's).
Exit status: 0 after a clean stop, 1 when the service could not start (a port
already in use), 2 on bad usage.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python import usage

log = Logger()

EXIT_OK, EXIT_CANNOT_START, EXIT_USAGE = 0, 1, 2

#: subcommand -> (twistd plugin name, module with C{Options} and C{makeService})
PLUGINS: dict[str, tuple[str, str]] = {
    "mediator": ("natbypass-mediator", "natbypass.app.mediator_tap"),
    "peer": ("natbypass-peer", "natbypass.app.peer_tap"),
}


class _HelpShown(Exception):
    """C{--help} printed the usage; the command ends with status 0."""


def command_options(name: str, out: TextIO) -> usage.Options:
    """
    The C{Options} of the twistd plugin behind C{natbypass NAME}, with a
    synopsis that names the command and C{--help} written to C{out}.
    """
    plugin, module_name = PLUGINS[name]
    base: type[usage.Options] = importlib.import_module(module_name).Options

    class CommandOptions(base):  # type: ignore[valid-type, misc]
        def getSynopsis(self) -> str:
            return (
                f"Usage: natbypass {name} {base.synopsis}\n"
                f"(the same options as 'twistd -n {plugin}'; Ctrl-C or SIGTERM stops it)"
            )

        def opt_help(self) -> None:
            """Display this help and exit."""
            out.write(str(self))
            raise _HelpShown()

        opt_h = opt_help

    CommandOptions.__name__ = base.__name__
    return CommandOptions()


def parse(name: str, argv: list[str], out: TextIO, err: TextIO) -> usage.Options | int:
    """Checked options for C{natbypass NAME argv}, or the exit status after C{--help} / a usage error."""
    options = command_options(name, out)
    try:
        options.parseOptions(argv)
    except _HelpShown:
        return EXIT_OK
    except usage.UsageError as e:
        err.write(f"natbypass {name}: {e}\nRun 'natbypass {name} --help' for the options.\n")
        return EXIT_USAGE
    return options


def serve(service: IService, reactor: Any) -> int:
    """
    Start C{service} once C{reactor} runs, stop it before the reactor shuts
    down (a signal, or C{reactor.stop()}), and run the reactor until then.
    Returns the exit status: 1 if C{startService} raised (then, as with
    twistd, nothing is stopped: the process ends), else 0.
    """
    status = [EXIT_OK]
    started = [False]

    def start() -> None:
        try:
            service.startService()
        except Exception:
            log.failure("{service} could not start", service=service)
            status[0] = EXIT_CANNOT_START
            reactor.stop()
        else:
            started[0] = True

    def stop() -> Any:
        if started[0] and service.running:
            return service.stopService()
        return None

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    return status[0]


def run(name: str, argv: list[str], reactor: Any = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """C{natbypass NAME argv}: parse with the plugin's options, build its service and serve it."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = parse(name, argv, out, err)
    if isinstance(options, int):
        return options
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
        globalLogBeginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
    module = importlib.import_module(PLUGINS[name][1])
    return serve(module.makeService(options, reactor), reactor)


def mediator(argv: list[str]) -> int:
    """C{natbypass mediator}: the C{natbypass-mediator} twistd plugin in the foreground."""
    return run("mediator", argv)


def peer(argv: list[str]) -> int:
    """C{natbypass peer}: the C{natbypass-peer} twistd plugin in the foreground."""
    return run("peer", argv)


def react_command(
    argv: list[str],
    parse_options: Callable[[list[str]], Any],
    main: Callable[[Any, Any], Awaitable[int]],
    stopped: int = EXIT_CANNOT_START,
) -> int:
    """
    Run a command (C{connect}, C{pipe}, C{forward}) under C{react}: parse
    C{argv} (argparse's C{SystemExit} becomes the status), run C{main(reactor,
    options)} and return its exit status instead of exiting, so the dispatcher
    decides.  A command stopped before C{main} returned (Ctrl-C, SIGTERM)
    ends with C{stopped}: a failure for a one-shot command, 0 for one that
    runs until it is stopped.
    """
    try:
        options = parse_options(argv)
    except SystemExit as e:
        return int(e.code or 0)
    result: list[int] = []

    async def body(reactor: Any) -> None:
        result.append(await main(reactor, options))

    try:
        react(lambda reactor: defer.ensureDeferred(body(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT_CANNOT_START
    return result[0] if result else stopped
