# Sourced by the bench scripts: parse_options "NAMES" "$@" sets each shell variable in NAMES
# (space-separated, given defaults beforehand) from "--name VALUE" ("--no-name" sets it to 0);
# dashes in option names stand for underscores. Anything else is an error naming the option.
parse_options() {
  local known=" $1 " name
  shift
  while (($#)); do
    name=${1#--}
    name=${name//-/_}
    if [[ $1 == --no-* && $known == *" ${name#no_} "* ]]; then
      printf -v "${name#no_}" 0
      shift
    elif [[ $1 == --* && $known == *" $name "* && $# -ge 2 ]]; then
      printf -v "$name" '%s' "$2"
      shift 2
    else
      echo "unknown option $1 (known: ${known})" >&2
      exit 2
    fi
  done
}
