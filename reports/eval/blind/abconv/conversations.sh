#!/bin/bash
# $1 = tag; runs 12 two-line conversations against a running worker
fills=(ok hmm sure lol k fine ok okay hmm sure cool ok)
i=0
while IFS= read -r m; do
  printf '%s\n%s\n' "$m" "${fills[$i]}" | USER="ab-$1-$i" timeout 120 .venv/bin/drhouse chat 2>/dev/null > /tmp/ab-$1-$i.txt
  i=$((i+1))
done < /tmp/convs.txt
