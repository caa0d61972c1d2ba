"""The official OpenAI Python SDK against moat: a chat, a streamed chat, an embedding, and the
SDK's exception classes for moat's errors. Run by tests/tests/dataplane_sdk.rs with
MOAT_BASE_URL, MOAT_API_KEY, MOAT_MODEL and MOAT_SIM_URL (the simulator's control URL) set.
Prints OK on success; any failure raises."""

import json
import os
import urllib.request

import openai
from openai import OpenAI

client = OpenAI(
    base_url=os.environ["MOAT_BASE_URL"],
    api_key=os.environ["MOAT_API_KEY"],
    max_retries=0,
    timeout=20,
)
model = os.environ["MOAT_MODEL"]
text = "the quick brown fox jumps over the lazy dog"

# A chat.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "echo"}, {"role": "user", "content": text}],
)
assert r.choices[0].message.content == text, r
assert r.usage.completion_tokens == 9, r.usage
assert r.model == model, r.model  # the public name, never the upstream's id

# A streamed chat, with usage at the end.
parts, usage = [], None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": text}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == text, parts
assert len(parts) == 9, parts
assert usage is not None and usage.completion_tokens == 9, usage

# A streamed chat without usage: the usage event moat asks for on its own is not shown, and
# every chunk names the public model.
parts, chunks = [], 0
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": text}], stream=True
):
    chunks += 1
    assert chunk.usage is None, chunk
    assert chunk.choices, chunk
    assert chunk.model == model, chunk.model
    if chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts) == text, parts
assert chunks == 11, chunks  # the role, 9 tokens, the finish

# An embedding (the SDK asks for base64 and decodes it).
e = client.embeddings.create(model=model, input=["one", "two", "three"])
assert len(e.data) == 3, e
assert len(e.data[0].embedding) == 8, e.data[0]
assert abs(sum(x * x for x in e.data[0].embedding) - 1.0) < 1e-3

# moat's errors map to the SDK's exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as err:
    assert err.status_code == 404 and err.body["param"] == "model", err.body
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], n=99)
    raise AssertionError("n over the cap accepted")
except openai.BadRequestError as err:
    assert err.body["param"] == "n", err.body

# Authorization: a model the caller's roles do not grant, and logprobs without the `logprobs`
# permission, are 403 → PermissionDeniedError; /v1/models lists only what may be used.
for kwargs in ({"model": os.environ["MOAT_DENIED_MODEL"]}, {"model": model, "logprobs": True}):
    try:
        client.chat.completions.create(messages=[{"role": "user", "content": "x"}], **kwargs)
        raise AssertionError(f"{kwargs} allowed")
    except openai.PermissionDeniedError as err:
        assert err.status_code == 403 and err.body["type"] == "permission_error", err.body
assert [m.id for m in client.models.list()] == [model]

# An upstream dying mid-stream surfaces as an APIError from the stream, not a hang.
req = urllib.request.Request(
    os.environ["MOAT_SIM_URL"] + "/_sim/fail",
    data=json.dumps({"mode": "reset_mid_stream", "after_chunks": 3, "count": 1}).encode(),
    headers={"content-type": "application/json"},
    method="POST",
)
urllib.request.urlopen(req).read()
got = []
try:
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            got.append(chunk.choices[0].delta.content)
    raise AssertionError("a broken stream ended as if complete")
except openai.APIError as err:
    assert "upstream" in str(err.message), err
assert got == ["the ", "quick "], got

print("OK")
