"""vLLM's `request_id` field: the caller's id names the response ("cmpl-<id>", "chatcmpl-<id>"), streamed
or not; one still running may not be reused; a bad one is a 400 naming the field."""
from __future__ import annotations

import pytest

from tests.server.conftest import MODEL_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_callers_request_id_names_the_response(client):
    completion = await client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                                                 extra_body={"request_id": "job-17"})
    assert completion.id == "cmpl-job-17"
    chat = await client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=2, extra_body={"request_id": "job-18"})
    assert chat.id == "chatcmpl-job-18"
    stream = await client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, stream=True,
                                             extra_body={"request_id": "job-19"})
    assert {chunk.id async for chunk in stream} == {"cmpl-job-19"}
    again = await client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                                            extra_body={"request_id": "job-17"})  # the first one finished
    assert again.id == "cmpl-job-17"


async def test_a_bad_request_id_is_refused(client):
    import openai
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, extra_body={"request_id": ""})
    assert caught.value.body["param"] == "request_id"
