# Shared by the launchers (sourced, not run): argument errors and quoting.
# The sourcing script defines `prog` and `usage`, and for
# check_module_python_env the variables `module`, `python` and `extra_env`.
# shellcheck shell=bash disable=SC2154

die_usage() {
  echo "$prog: error: $*" >&2
  echo >&2
  usage >&2
  exit 2
}

# Shell-quotes its arguments, one line, so printed commands can be pasted.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# --module is a python module name, --python is set, each --env is NAME=VALUE.
check_module_python_env() {
  [[ $module =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] ||
    die_usage "--module must be a python module name like dqvq.train," \
      "got '$module'"
  [[ -n $python ]] || die_usage "--python must not be empty"
  local kv
  for kv in ${extra_env[@]+"${extra_env[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
      die_usage "--env takes NAME=VALUE, got '$kv'"
  done
}
