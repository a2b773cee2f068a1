#!/bin/sh
# Docker ENTRYPOINT: migrate when this container is the designated one (under the advisory lock),
# then become the service itself: same PID, so signals reach it directly.
set -eu
exec prosaas-migrate run -- "$@"
