# NATbypass: one image for the mediator (STUN responder, RFC 8489 over UDP and
# TCP, RFC 5780 with a second address, and the signalling service) and for
# peers.  The entrypoint is the `natbypass` command; the CMD runs the mediator.
#
#   docker build -t natbypass .
#   docker run --rm -p 3478:3478/udp -p 3478:3478/tcp -p 7000:7000 natbypass
#   docker run --rm natbypass mediator --help
#   docker run --rm -v natbypass-peer:/var/lib/natbypass natbypass \
#       peer --mediator tcp:MEDIATOR:7000 --id bob --identity /var/lib/natbypass/identity.pem
#
# Arguments given to `docker run` replace the CMD below, so name the subcommand
# (`mediator ...`, `peer ...`, `detect ...`, `id ...`).  deploy/compose.yaml runs
# both services; docs/deploy-gcp.md runs the mediator on Google Cloud.
#
# RFC 5780 NAT behaviour discovery needs two IPs that the container sees as its
# own, so run the mediator with the host's network and name them:
#
#   docker run --rm --network host natbypass \
#       mediator --stun 192.0.2.10:3478 --stun-alternate 192.0.2.11:3479
#
# BASE: any Debian-like image with python3 >= 3.11 and its venv module.  The
# default is what users pull; .ci/docker_check.sh passes an image it built from
# Debian's packages, because its machine reaches no image registry.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/natbypass \
    PATH=/opt/natbypass/bin:$PATH

COPY . /tmp/natbypass-src

# A virtual environment, so the same steps work on python:3.11-slim and on a
# distribution's Python that refuses `pip install` outside one (PEP 668).
# Installed as root, then Twisted's plugin cache (dropin.cache) is regenerated
# while site-packages is still writable: pip installs from a wheel, so
# setup.py's own refresh does not run, and the unprivileged user below could
# not write the cache (twistd would then rescan the plugins, and warn, on every
# start).  The build fails here if twistd cannot see the plugin or the
# `natbypass` command does not run.
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install /tmp/natbypass-src \
 && install -D -m 0755 /tmp/natbypass-src/deploy/healthcheck.py "$VIRTUAL_ENV/libexec/natbypass-healthcheck" \
 && rm -rf /tmp/natbypass-src \
 && python3 -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && twistd --help | grep -q natbypass-mediator \
 && natbypass mediator --help >/dev/null \
 && useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin natbypass \
 && install -d -o natbypass -g natbypass -m 0700 /var/lib/natbypass

# State that must outlive a container (a peer's identity key, a token file) goes
# in /var/lib/natbypass: mount a volume there.  XDG_CONFIG_HOME puts a peer's
# default identity.pem and known_peers in it too.
ENV XDG_CONFIG_HOME=/var/lib/natbypass
USER natbypass
WORKDIR /var/lib/natbypass

# STUN (primary and, for RFC 5780, alternate port) over UDP and TCP;
# signalling; metrics and /healthz when --metrics tcp:9100 is given.
EXPOSE 3478/udp 3478/tcp 3479/udp 3479/tcp 7000/tcp 9100/tcp

# GET /healthz on the --metrics endpoint of the natbypass process (the mediator
# or a peer); healthy while the process runs when it has no --metrics.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/natbypass/bin/python3", "/opt/natbypass/libexec/natbypass-healthcheck"]

# `natbypass` is PID 1 and handles SIGTERM itself (exec form: no shell in
# between): `docker stop` stops the service cleanly, peers first told.
ENTRYPOINT ["natbypass"]
CMD ["mediator", "--stun", "0.0.0.0:3478", "--signal", "tcp:7000"]
