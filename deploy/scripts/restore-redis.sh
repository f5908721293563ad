#!/bin/sh
# Restore a backup RDB file into a Redis data directory that uses the append-only file.
#   deploy/scripts/restore-redis.sh BACKUP.rdb DATA_DIR [PORT]
# Stop the Redis that owns DATA_DIR first. With AOF on, Redis ignores dump.rdb at start-up
# (it would open an empty AOF), so this loads the snapshot in a private Redis with AOF off,
# turns AOF on (written from memory), waits until it is on disk, and shuts that Redis down.
# The old AOF is kept as DATA_DIR/appendonlydir.before-restore-<time>. Then start Redis as usual.
# POSIX sh, so it also runs in the redis image (README, "Running in production").
set -eu
backup="$1"
data="$2"
port="${3:-6390}"
[ -f "$backup" ] || { echo "no backup file $backup" >&2; exit 1; }
mkdir -p "$data"
if [ -d "$data/appendonlydir" ]; then
  mv "$data/appendonlydir" "$data/appendonlydir.before-restore-$(date -u +%Y%m%dT%H%M%SZ)"
fi
cp "$backup" "$data/dump.rdb"
redis-server --port "$port" --bind 127.0.0.1 --dir "$data" --dbfilename dump.rdb \
  --appendonly no --save "" --daemonize yes --logfile "$data/restore.log"
cli() { redis-cli -p "$port" "$@"; }
tries=0
until [ "$(cli ping 2>/dev/null)" = "PONG" ]; do
  tries=$((tries + 1)); [ "$tries" -lt 100 ] || { echo "restore Redis did not start" >&2; exit 1; }
  sleep 0.1
done
until cli info persistence | grep -q '^loading:0'; do sleep 0.1; done
cli config set appendonly yes >/dev/null
until cli info persistence | grep -q '^aof_enabled:1' \
  && cli info persistence | grep -q '^aof_rewrite_in_progress:0' \
  && cli info persistence | grep -q '^aof_rewrite_scheduled:0'; do
  sleep 0.1
done
keys="$(cli dbsize)"
cli shutdown save >/dev/null 2>&1 || true
echo "restored $keys keys into $data"
