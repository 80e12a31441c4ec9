#!/bin/sh
# The default user and vhost from the environment, as the official image takes
# them; other settings come from files mounted into /etc/rabbitmq/conf.d/.
set -eu
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then
  {
    echo "default_user = $RABBITMQ_DEFAULT_USER"
    echo "default_pass = ${RABBITMQ_DEFAULT_PASS:?set RABBITMQ_DEFAULT_PASS}"
    echo "default_vhost = ${RABBITMQ_DEFAULT_VHOST:-/}"
    echo "loopback_users = none"
  } > /etc/rabbitmq/conf.d/00-defaults.conf
fi
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
exec rabbitmq-server "$@"
