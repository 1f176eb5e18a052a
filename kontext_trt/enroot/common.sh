# Shell helpers shared by the enroot scripts (sourced; build_engines.sbatch keeps its own copy because
# Slurm runs a spooled copy of the batch script, away from this folder).

die() {
  echo "error: $*" >&2
  exit 2
}

# Print a command the way a shell would read it back.
show() {
  local word words=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then words+=("$word"); else words+=("${word@Q}"); fi
  done
  echo "${words[*]}"
}

# Run a command, or only print it under --dry-run (the caller sets dry_run).
# shellcheck disable=SC2154
run() {
  if ((dry_run)); then show "$@"; else "$@"; fi
}

need() {
  (($1 >= 2)) || die "$2 needs a value"
}
