#!/usr/bin/env bash
# Start a PostgreSQL server on localhost for the shared-study tests and print its URL.
# Installs Debian's postgresql package when it is missing. Safe to run more than once.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  as_root apt-get update -qq >&2
  as_root apt-get install -y -qq postgresql >&2
fi
if ! command -v pg_lsclusters >/dev/null; then
  echo "postgres.sh: pg_lsclusters not found (Debian's postgresql-common)" >&2; exit 1
fi
read -r version cluster port _ < <(pg_lsclusters --no-header | head -1)
if [ -z "${version:-}" ]; then
  version=$(ls /usr/lib/postgresql | sort -V | tail -1)
  as_root pg_createcluster "$version" main >&2
  read -r version cluster port _ < <(pg_lsclusters --no-header | head -1)
fi
as_root pg_ctlcluster "$version" "$cluster" start >&2 2>/dev/null || true
for _ in $(seq 30); do
  pg_isready -q -h localhost -p "$port" && break
  sleep 1
done
psql_su() { as_root runuser -u postgres -- psql -p "$port" -qtAc "$1"; }
if [ "$(psql_su "SELECT 1 FROM pg_roles WHERE rolname='cifarlab'")" != 1 ]; then
  psql_su "CREATE ROLE cifarlab LOGIN PASSWORD 'cifarlab'" >&2
fi
if [ "$(psql_su "SELECT 1 FROM pg_database WHERE datname='cifarlab_test'")" != 1 ]; then
  psql_su "CREATE DATABASE cifarlab_test OWNER cifarlab" >&2
fi
echo "postgresql://cifarlab:cifarlab@localhost:${port}/cifarlab_test"
