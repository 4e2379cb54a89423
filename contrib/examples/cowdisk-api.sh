#!/bin/sh
# cowdiskd from a shell: curl --unix-socket, jq-free (the answers are read with sed).
# Run against a daemon: COWDISK_SOCKET=/run/cowdisk/cowdisk.sock TREE=/var/lib/cowdisk/incoming/tree sh cowdisk-api.sh
# (TREE: a root filesystem tree under the daemon's import_roots). tests/host/test_daemon.py runs it.
set -eu
SOCK=${COWDISK_SOCKET:-/run/cowdisk/cowdisk.sock}
api() {  # api METHOD PATH [JSON-BODY]: prints the answer, fails on an HTTP error
    if [ $# -ge 3 ]; then
        curl -sS --fail-with-body --unix-socket "$SOCK" -X "$1" -H 'Content-Type: application/json' \
             -d "$3" "http://cowdisk$2"
    else
        curl -sS --fail-with-body --unix-socket "$SOCK" -X "$1" "http://cowdisk$2"
    fi
}
field() { grep -o "\"$1\":\"[^\"]*\"" | head -n 1 | cut -d\" -f4; }  # the first string field NAME of a JSON answer

api GET /v1/health | field status

# a template: a job; wait for it with a long-poll until it ends
job=$(api POST /v1/templates/build "{\"source\":\"$TREE\",\"name\":\"shell-base\"}" | field id)
state=running
while [ "$state" = queued ] || [ "$state" = running ]; do
    state=$(api GET "/v1/jobs/$job?wait=30" | field state)
done
echo "template job $job: $state"
[ "$state" = succeeded ]

# a sandbox's disk: create, checkpoint, restore as a new id, remove
echo "created sandbox-1: $(api POST /v1/volumes '{"id":"sandbox-1","template":"shell-base"}' | field state)"
api GET /v1/volumes/sandbox-1/drive?format=firecracker | field path
api POST /v1/volumes/sandbox-1/checkpoint | field state
api POST /v1/volumes/sandbox-1/restore '{"new_id":"sandbox-2"}' | field state

# errors are one JSON document, with the HTTP status and the CLI's exit code
code=$(curl -sS --unix-socket "$SOCK" -o /dev/null -w '%{http_code}' http://cowdisk/v1/volumes/nope)
echo "missing volume: HTTP $code"
[ "$code" = 404 ]

api DELETE /v1/volumes/sandbox-2 >/dev/null && echo "removed sandbox-2"
api DELETE /v1/volumes/sandbox-1 >/dev/null && echo "removed sandbox-1"
api DELETE /v1/templates/shell-base >/dev/null
api GET /metrics | grep '^cowdisk_volumes' || true
