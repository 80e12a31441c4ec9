#!/usr/bin/env bash
# (Re)start the local services geoscrape's tests need, if they are down:
# RabbitMQ, Redis and PostgreSQL, as installed from the Debian packages.
set -euo pipefail

wait_for() {  # wait_for NAME CMD...
  local name=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then echo "$name: up"; return 0; fi
    sleep 1
  done
  echo "$name: did not come up" >&2
  return 1
}

if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  echo "RabbitMQ is down: starting it"
  rabbitmq-server -detached
  wait_for RabbitMQ rabbitmq-diagnostics -q ping
  rabbitmqctl await_startup >/dev/null
else
  echo "RabbitMQ: up"
fi

if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  echo "Redis is down: starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis redis-cli -h 127.0.0.1 ping
else
  echo "Redis: up"
fi

if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  echo "PostgreSQL is down: starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  wait_for PostgreSQL pg_isready -h 127.0.0.1 -p 5432
else
  echo "PostgreSQL: up"
fi
