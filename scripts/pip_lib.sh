# Sourced by the scripts that install a multi-GB torch into a venv of their own (build_cuda.sh,
# test_min_torch.sh). Expects $VENV (the venv's folder).

# pip without its cache: a CUDA torch with its NVIDIA wheels is ~5 GB installed, and pip's cache
# would hold another copy of the downloads (CI once ran out of disk in this install).
P="$VENV/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir"

# Drops pip's "is ignored" notices but keeps its exit status (pipefail): a failed install fails.
quiet() { "$@" 2>&1 | { grep -v "is ignored" || true; }; }

# need_disk GB WHAT: fails, saying how much is free, unless GB are free where the venv and pip's
# temporary files go; run before a download that would otherwise die half-way with ENOSPC.
need_disk() {
  local gb=$1 what=$2 dir kb
  for dir in "$VENV" "${TMPDIR:-/tmp}"; do
    kb=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
    if [ "$kb" -lt $((gb * 1024 * 1024)) ]; then
      echo "$(basename "$0"): not enough disk for $what: $((kb / 1024)) MiB free in $dir, needs ~$gb GiB" >&2
      return 1
    fi
  done
}
