#!/usr/bin/env bash
# Make sure the tests have Redis: the redis-server binary (tests/test_outages.py and
# tests/test_deploy.py start servers of their own on free ports) and a Redis answering on
# 127.0.0.1:${REDIS_PORT:-6379} (started here when none answers). Installs Debian's
# redis-server when it is missing. Used by `make test` and CI.
set -euo pipefail
port="${REDIS_PORT:-6379}"
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's redis-server" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools
fi
if redis-cli -p "$port" ping >/dev/null 2>&1; then
  exit 0
fi
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --logfile /tmp/drhouse-redis-test.log
for _ in $(seq 50); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "redis-server did not start on port $port" >&2
exit 1
