"""Schemathesis checks of Keel's own: every error answer is the README's JSON
`{"error": "..."}`, whatever the status, and the server never answers 5xx to
anything a client sends (the built-in `not_a_server_error` as well)."""

import schemathesis


@schemathesis.check
def errors_are_json(ctx, response, case):
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except Exception as e:  # noqa: BLE001 - any undecodable body is the failure
        raise AssertionError(f"{response.status_code} answer is not JSON: {response.text[:200]!r}") from e
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        raise AssertionError(f"{response.status_code} answer without an `error` string: {response.text[:200]!r}")
    return None
