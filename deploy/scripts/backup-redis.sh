#!/bin/sh
# Snapshot a running Redis into a timestamped RDB file, keeping the newest KEEP of them.
#   deploy/scripts/backup-redis.sh [REDIS_URL] [BACKUP_DIR] [KEEP]
# Defaults: $REDIS_URL or redis://127.0.0.1:6379/0, ./backups, 14. Safe while the bot runs
# (Redis streams the snapshot like a replica would). Cron it, and copy BACKUP_DIR off the host.
# Restore with deploy/scripts/restore-redis.sh. POSIX sh, so it also runs in the redis image.
set -eu
url="${1:-${REDIS_URL:-redis://127.0.0.1:6379/0}}"
dir="${2:-backups}"
keep="${3:-14}"
mkdir -p "$dir"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
file="$dir/house-$stamp.rdb"
if ! out="$(redis-cli -u "$url" --no-auth-warning --rdb "$file.part" 2>&1)"; then
  rm -f "$file.part"
  echo "$out" >&2
  exit 1
fi
mv "$file.part" "$file"
# Prune: newest first, drop everything past KEEP.
ls -1t "$dir"/house-*.rdb 2>/dev/null | tail -n +"$((keep + 1))" | while read -r old; do
  rm -f "$old"
done
echo "$file"
