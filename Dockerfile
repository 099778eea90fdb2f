# NATbypass mediator: STUN responder (RFC 8489 over UDP and TCP, RFC 5780 with a
# second address) and the signalling service.
#
#   docker build -t natbypass-mediator .
#   docker run --rm -p 3478:3478/udp -p 3478:3478/tcp -p 7000:7000 natbypass-mediator
#
# RFC 5780 NAT behaviour discovery needs two public IPs that the container sees
# as its own, so run it with the host's network and name them:
#
#   docker run --rm --network host natbypass-mediator \
#       --stun 192.0.2.10:3478 --stun-alternate 192.0.2.11:3479
#
# Arguments given to `docker run` replace the CMD below (the mediator's options;
# `docker run IMAGE --help` lists them).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY . /tmp/natbypass-src

# Install as root, then regenerate Twisted's plugin cache (dropin.cache) while
# site-packages is still writable: pip installs from a wheel, so setup.py's own
# refresh does not run, and the unprivileged user below could not write the
# cache (twistd would then rescan the plugins, and warn, on every start).  The
# build fails here if twistd cannot see the plugin.
RUN pip install /tmp/natbypass-src \
 && rm -rf /tmp/natbypass-src \
 && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && twistd --help | grep -q natbypass-mediator \
 && useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin natbypass

USER natbypass
WORKDIR /tmp

# STUN (primary and, for RFC 5780, alternate port) over UDP and TCP; signalling.
EXPOSE 3478/udp 3478/tcp 3479/udp 3479/tcp 7000/tcp

# twistd is PID 1 and handles SIGTERM itself (exec form: no shell in between).
# --pidfile= : no pid file in a read-only or foreign working directory.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "natbypass-mediator"]
CMD ["--stun", "0.0.0.0:3478", "--signal", "tcp:7000"]
