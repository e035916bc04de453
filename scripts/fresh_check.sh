#!/usr/bin/env bash
# A rehearsal of CI on this machine: clone the committed tree into a temporary folder,
# and run the README's test command there, which makes a new .venv and installs
# whatever is missing. Uncommitted changes are not part of the clone, exactly as they
# are not part of a submission: the script says so first.
# Usage: scripts/fresh_check.sh [--keep]   (--keep leaves the clone for a post-mortem)
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1
if [ -n "$(git status --porcelain)" ]; then
  echo "fresh-check: note: uncommitted changes are not checked:"
  git status --short | head -20
fi
dir=$(mktemp -d /tmp/remote-hw-fresh.XXXXXX)
echo "fresh-check: cloning $(git rev-parse --short HEAD) into $dir"
git clone -q "$PWD" "$dir/remote-hw"
cd "$dir/remote-hw"
start=$(date +%s)
status=0
CI=true bash .ci/run || status=$?
echo "fresh-check: .ci/run exited $status after $(( $(date +%s) - start )) s in $dir/remote-hw"
if [ "$status" = 0 ] && [ "$keep" = 0 ]; then
  rm -rf "$dir"
fi
exit "$status"
