#!/usr/bin/env bash
# Run the local stack's MongoDB-compatible server in the foreground (exec: the caller's PID is
# the server's, so stopping it by PID with SIGTERM closes the data store cleanly).
#
#   localstack/mongo/run.sh <build_dir> <host> <port> <data_dir>
#
# It listens on <host>:<port> and nowhere else, keeps its data in <data_dir>/snapmap.mv.db,
# and sends nothing anywhere (mongo-java-server has no telemetry). MONGO_JAVA_OPTS replaces
# the default JVM options.
set -euo pipefail

fail() {
    echo "mongo run: $*" >&2
    exit 1
}

[[ $# -eq 4 ]] || fail "usage: $0 <build_dir> <host> <port> <data_dir>"
build_dir="$1" host="$2" port="$3" data_dir="$4"
jar="$build_dir/maven/snapmap-local-mongo.jar"
[[ -f "$jar" && -f "$build_dir/BUILD_STAMP" ]] \
    || fail "no server built in $build_dir; run localstack/mongo/install.sh $build_dir first"
command -v java >/dev/null 2>&1 || fail "java not found on PATH"
mkdir -p "$data_dir" || fail "cannot create data dir $data_dir"

# Serial GC and a bounded heap suit a 2-core machine shared with Kafka and Dagster.
# shellcheck disable=SC2086  # the options are a list of words on purpose
exec java ${MONGO_JAVA_OPTS:--Xms64m -Xmx2g -XX:+UseSerialGC} \
    -Dorg.slf4j.simpleLogger.showDateTime=true \
    -Dorg.slf4j.simpleLogger.dateTimeFormat="yyyy-MM-dd'T'HH:mm:ss.SSSZ" \
    -Dorg.slf4j.simpleLogger.log.io.netty=warn \
    -cp "$jar:$build_dir/maven/lib/*" \
    snapmap.localstack.mongo.LocalMongoServer "$host" "$port" "$data_dir"
