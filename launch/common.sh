# Shared by the launchers (sourced, not run): option parsing, argument errors
# and quoting.
# The sourcing script defines `prog` and `usage`, and for
# check_module_python_env the variables `module`, `python` and `extra_env`;
# the option parsers set `opt`, `value` and `taken` for it (SC2034: used by
# the sourcing script, not here).
# shellcheck shell=bash disable=SC2154,SC2034

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

# Option parsing, the same in every launcher: `--opt=value` and `--opt value`
# both work, and `_` and `-` are the same (`--num_processes` is
# `--num-processes`). For each argument the loop calls `split_option "$1"`
# (sets `opt` and, from `--opt=value`, `value` and `has_value`), then
# `flag_option` for an option without a value or `value_option "$@"` for one
# with; both set `taken`, how many arguments the loop shifts.
split_option() {
  opt=$1 value='' has_value=0
  if [[ $opt == --*=* ]]; then
    value=${opt#*=} opt=${opt%%=*} has_value=1
  fi
  opt=${opt//_/-}
}

# A flag given a value (`--dry-run=0`) is an error, not silently on.
flag_option() {
  ((!has_value)) || die_usage "$opt takes no value"
  taken=1
}

value_option() {
  taken=1
  if ((!has_value)); then
    (($# >= 2)) || die_usage "$1 needs a value"
    value=$2 taken=2
  fi
}
