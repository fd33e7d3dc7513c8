# Sourced by the launch scripts: `run CMD...` runs CMD, or with DRY=1 prints it on one line, every argument that
# needs it in single quotes (as Python's shlex.quote), so a dry run shows the exact commands.
# (launch/slurm.sbatch keeps its own copy: sbatch runs a spooled copy of the script, away from this file.)
quote() {
  local out=() a sq="'" esc="'\\''"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$a"); else out+=("'${a//$sq/$esc}'"); fi
  done
  echo "${out[*]}"
}
run() { if ((DRY)); then quote "$@"; else "$@"; fi; }
