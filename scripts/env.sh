# Sourced by the Makefile's targets: the local stack's connection settings, then the pipeline's
# optional settings with their defaults (kept when already set, e.g. to point at production).
# Dagster's EnvVar needs every wired variable to exist; an empty value means "not used".
# Outside production it says on stderr, in one line, which stack folder and ports the settings
# point at (a new shell without SNAPMAP_STACK_DIR and SNAPMAP_*_PORT gets the default stack);
# SNAPMAP_QUIET=1 leaves that line out; a bad setting makes `source` fail. Standard output stays empty.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_py="$_root/.venv/bin/python"
[ -x "$_py" ] || _py=python3
if [ -z "${SNAPMAP_PRODUCTION:-}" ]; then
  _where=--where
  [ "${SNAPMAP_QUIET:-}" = 1 ] && _where=
  # A bad setting (a port out of range, say) is reported by stack.py on stderr; stop here
  # rather than go on with the connection settings unset.
  if ! _settings="$("$_py" "$_root/localstack/stack.py" env $_where)"; then
    unset _root _py _where _settings
    return 1
  fi
  eval "$_settings"
  unset _where _settings
fi
export SNAPMAP_UPLOADS_TOPIC="${SNAPMAP_UPLOADS_TOPIC:-photo-uploads}"
export SNAPMAP_DEAD_LETTER_TOPIC="${SNAPMAP_DEAD_LETTER_TOPIC:-photo-uploads.dlq}"
export SNAPMAP_EVENT_UPDATES_TOPIC="${SNAPMAP_EVENT_UPDATES_TOPIC:-event-updates}"
export SNAPMAP_CONSUMER_GROUP="${SNAPMAP_CONSUMER_GROUP:-snapmap-pipeline}"
export KAFKA_SECURITY_PROTOCOL="${KAFKA_SECURITY_PROTOCOL:-PLAINTEXT}"
export KAFKA_SASL_MECHANISM="${KAFKA_SASL_MECHANISM:-}"
export KAFKA_SASL_USERNAME="${KAFKA_SASL_USERNAME:-}"
export KAFKA_SASL_PASSWORD="${KAFKA_SASL_PASSWORD:-}"
export KAFKA_SSL_CA_LOCATION="${KAFKA_SSL_CA_LOCATION:-}"
export MONGODB_DATABASE="${MONGODB_DATABASE:-snapmap}"
# A single local server has no replica set to acknowledge "majority".
export MONGODB_WRITE_CONCERN="${MONGODB_WRITE_CONCERN:-1}"
export AZURE_STORAGE_CONNECTION_STRING="${AZURE_STORAGE_CONNECTION_STRING:-}"
export AZURE_STORAGE_ACCOUNT_URL="${AZURE_STORAGE_ACCOUNT_URL:-}"
export AZURE_STORAGE_SAS="${AZURE_STORAGE_SAS:-}"
export DAGSTER_HOME="${DAGSTER_HOME:-$_root/.dagster_home}"
unset _root _py
