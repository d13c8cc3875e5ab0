#!/usr/bin/env bash
# The REST API with curl: create a workflow, run it synchronously, list, watch events.
#
#   FLOWPORT_API_KEY=$(cat .flowport/admin-api-key) bash clients/examples/curl.sh
#
# FLOWPORT_URL picks the address (default http://127.0.0.1:8080, Envoy of `flowport up`).
set -euo pipefail
url=${FLOWPORT_URL:-http://127.0.0.1:8080}
key=${FLOWPORT_API_KEY:?set FLOWPORT_API_KEY (see .flowport/admin-api-key)}
api() { curl -sS --fail-with-body -H "x-api-key: $key" -H 'content-type: application/json' "$@"; }

echo '# a workflow (each POST makes a new version)'
api -X POST "$url/api/workflows" -d '{
  "name": "greeter",
  "nodes": [{"type": "PythonCodeNode", "name": "greet", "config": {"code": "result = {\"greeting\": \"hello \" + name}"}}]
}'
echo
echo '# run it and wait for the result (the Kailash-compatible route)'
api -X POST "$url/workflows/greeter/execute" -d '{"inputs": {"name": "ada"}}'
echo
echo '# start one without waiting, then read it'
id=$(api -X POST "$url/api/executions" -d '{"workflow_id": "greeter", "inputs": {"name": "bob"}}' |
  sed -E 's/.*"execution_id":"([^"]+)".*/\1/')
api "$url/api/executions/$id:watch" --max-time 10 | tail -n 1
echo
echo '# the last executions of the workflow'
api "$url/api/executions?workflow_id=greeter&page_size=3"
echo
echo '# an error is JSON too: code, message and details'
api "$url/api/executions/exe_missing" || true
echo
