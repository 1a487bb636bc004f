#!/usr/bin/env bash
# Build the local stack's MongoDB-compatible server (mongo-java-server + H2 backend, see
# docs/mongodb-compatible-server.md) into <build_dir>, from Maven Central with the JDK's Maven.
#
#   localstack/mongo/install.sh <build_dir>
#   localstack/mongo/install.sh --stamp    # what a build of the current sources is stamped
#
# Idempotent: when <build_dir> already holds a build of the same pom and sources it does
# nothing. Any failure prints one line starting with "mongo install:" and exits non-zero;
# Maven's own output is kept in <build_dir>/install.log.
# A cold build (empty ~/.m2) resolves about 20 MB from Maven Central; MAVEN_OPTS is passed to
# Maven as usual (for example -Dmaven.repo.local=DIR for a separate local repository).
set -euo pipefail

fail() {
    echo "mongo install: $*" >&2
    exit 1
}

src_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# What a build is made from: the pom (which pins every version), our Java sources, and the
# scripts that build and start it (run.sh sets the heap). `install.sh --stamp` prints it: the
# stack compares it with a running server's build.
stamp="$(cd "$src_dir" && find pom.xml install.sh run.sh src -type f -print0 \
    | LC_ALL=C sort -z \
    | xargs -0 sha256sum | sha256sum | cut -c1-16)"
if [[ $# -eq 1 && "$1" == "--stamp" ]]; then
    echo "$stamp"
    exit 0
fi
[[ $# -eq 1 && -n "$1" ]] || fail "usage: $0 <build_dir> | --stamp"
mkdir -p "$1" || fail "cannot create build dir $1"
build_dir="$(cd "$1" && pwd)"

command -v java >/dev/null 2>&1 || fail "java not found on PATH (a JDK 17 or newer is needed)"
command -v mvn >/dev/null 2>&1 || fail "mvn not found on PATH (Apache Maven 3.6 or newer)"
java_spec="$(java -XshowSettings:properties -version 2>&1 \
    | sed -n 's/^ *java\.specification\.version = //p')"
[[ "${java_spec%%.*}" =~ ^[0-9]+$ && "${java_spec%%.*}" -ge 17 ]] \
    || fail "java ${java_spec:-of unknown version} found; 17 or newer is needed"

stamp_file="$build_dir/BUILD_STAMP"
jar="$build_dir/maven/snapmap-local-mongo.jar"
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" && -f "$jar" ]]; then
    echo "mongo install: up to date in $build_dir"
    exit 0
fi

rm -rf "$build_dir/maven" "$stamp_file"
log="$build_dir/install.log"
started=$SECONDS
if ! mvn -B -f "$src_dir/pom.xml" -Dmongo.build.dir="$build_dir/maven" \
        -Dmaven.test.skip=true package >"$log" 2>&1; then
    if grep -q -E 'Could not (resolve|transfer)|Unknown host|Connection (refused|timed out)' "$log"
    then
        fail "download from Maven Central failed; see $log"
    fi
    fail "maven build failed; see $log"
fi
[[ -f "$jar" ]] || fail "maven finished but $jar is missing; see $log"

echo "$stamp" >"$stamp_file"
echo "mongo install: built in $((SECONDS - started)) s into $build_dir"
