#!/bin/sh
# The demo app: prints the synced message every two seconds. devloop's agent
# restarts it after each sync, so an edit shows up at once.
echo "app started in $(pwd)"
while true; do
  cat message.txt
  sleep 2
done
