#!/bin/sh
# `buf breaking` against main: the contract may only grow (buf.yaml, rules FILE).
#
# "main" is where this checkout left main: on a branch, the merge base with $MAIN (main, or
# origin/main in a clone that has no local main), so that only the branch's own changes are
# judged, however far main has moved since; on main itself (where the merge base is HEAD),
# the previous commit, so that each commit landing on main is judged against the one before.
# The working tree is what is judged, uncommitted changes included.
set -eu
cd "$(dirname "$0")/.."
command -v git >/dev/null || { echo "breaking.sh: git is needed to compare with main" >&2; exit 1; }
main=${MAIN:-main}
git rev-parse -q --verify "$main^{commit}" >/dev/null || main=origin/main
base=$(git merge-base HEAD "$main" 2>/dev/null || true)
if [ -z "$base" ] || [ "$base" = "$(git rev-parse HEAD)" ]; then
  base=$(git rev-parse -q --verify 'HEAD~1^{commit}') || {
    # A clone of one commit (git clone --depth 1) has nothing to compare with: say so loudly,
    # but do not fail the build for the way it was cloned.
    echo "breaking.sh: WARNING: no earlier commit here (a shallow clone?): the contract was" \
      "not compared; fetch main's history to compare it" >&2
    exit 0
  }
fi
echo "buf breaking against $base"
exec buf breaking --against ".git#ref=$base"
