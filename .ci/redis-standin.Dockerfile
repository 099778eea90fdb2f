# A stand-in for the official redis:7 image, for .ci/docker_check.sh on a
# machine that reaches Debian's mirror but no image registry: Debian's
# redis-server (7.0) on the same Debian base as the project's image, laid out
# like the official one (user `redis`, data in /data, redis-server and
# redis-cli on PATH), so deploy/compose.yaml runs unchanged against it.
ARG BASE=natbypass-base:bookworm
FROM ${BASE}
RUN apt-get -o Acquire::Check-Valid-Until=false update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && install -d -o redis -g redis -m 0750 /data \
 && redis-server --version && command -v redis-cli
VOLUME /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
