-- wrk script for `make bench`: POST the recorded OPA 1.6.0 report to /v1/version.
-- Every request carries the same instance id, so the server upserts one row per day and the
-- stored report count must equal the number of 200s (wrk counts non-2xx answers separately).
wrk.method = "POST"
wrk.path = (os.getenv("WRK_PREFIX") or "") .. "/v1/version"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["User-Agent"] = "Open Policy Agent/1.6.0 (linux, amd64)"
wrk.body = '{"heap_usage_bytes":"2106336","id":"a72dc36a-72db-458d-9208-9be4189e4ab7","version":"1.6.0"}\n'
