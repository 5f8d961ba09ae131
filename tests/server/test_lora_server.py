"""LoRA adapters through the server as vLLM serves them: --lora-modules names, `model` choosing one with the
official openai client (the same tokens as offline with that LoRARequest), /v1/models listing them with the
base model as parent, unknown names 404, and runtime loading behind VLLM_ALLOW_RUNTIME_LORA_UPDATING, over two tensor-parallel ranks too."""
from __future__ import annotations

import aiohttp
import pytest

from asyncserve import LLM, LoRARequest, SamplingParams
from tests.peft_adapters import save_peft_adapter
from tests.server.conftest import MODEL_NAME, live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")
pytest.importorskip("peft")

PROMPT = "The capital of France is"
LORA = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "dtype": "float32"}


@pytest.fixture(scope="module")
def adapter_dirs(model_path, tmp_path_factory):
    paths = []
    for index, targets in enumerate([["q_proj", "v_proj"], ["gate_proj", "down_proj"]]):
        path = str(tmp_path_factory.mktemp(f"server-adapter{index}"))
        save_peft_adapter(model_path, path, targets, rank=4, alpha=16, seed=10 + index)
        paths.append(path)
    return paths


def _offline_tokens(model_path, lora):
    llm = LLM(model_path, device="cpu", num_gpu_blocks_override=128, **LORA)
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False,
                       lora_request=lora)
    return out[0].outputs[0].token_ids


async def test_adapters_by_name_with_the_openai_client(model_path, adapter_dirs):
    import openai
    modules = [{"name": "sql", "path": adapter_dirs[0]}, {"name": "chat", "path": adapter_dirs[1]}]
    async with live_server(model_path, {"lora_modules": modules}, **LORA) as live:
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="x")
        models = (await client.models.list()).data
        assert [m.id for m in models] == [MODEL_NAME, "sql", "chat"]
        assert [m.parent for m in models[1:]] == [MODEL_NAME, MODEL_NAME]
        assert (await client.models.retrieve("sql")).root == adapter_dirs[0]
        results = {}
        for name in (MODEL_NAME, "sql", "chat"):
            result = await client.completions.create(model=name, prompt=PROMPT, max_tokens=10, temperature=0,
                                                     extra_body={"ignore_eos": True})
            results[name] = result.choices[0].text
        stream = await client.completions.create(model="sql", prompt=PROMPT, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        streamed = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
        assert streamed == results["sql"]  # the stream runs the same adapter
        chat = await client.chat.completions.create(model="chat", max_tokens=4,
                                                    messages=[{"role": "user", "content": "Hi"}])
        assert chat.model == "chat" and chat.choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError, match="The model 'nope' does not exist"):
            await client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
        await client.close()
    tokenizer = live.engine.tokenizer
    for name, lora in ((MODEL_NAME, None), ("sql", LoRARequest("sql", 1, adapter_dirs[0])),
                       ("chat", LoRARequest("chat", 2, adapter_dirs[1]))):
        assert results[name] == tokenizer.decode(_offline_tokens(model_path, lora), skip_special_tokens=True)
    assert len(set(results.values())) == 3  # each adapter changed the output


async def test_runtime_loading_is_behind_vllms_switch(model_path, adapter_dirs):
    async with live_server(model_path, {"allow_runtime_lora_updating": False}, **LORA) as live, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{live.url}/v1/load_lora_adapter",
                             json={"lora_name": "x", "lora_path": adapter_dirs[0]}) as response:
            assert response.status == 403
            assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in (await response.json())["error"]["message"]
    async with live_server(model_path, {"allow_runtime_lora_updating": True}, **LORA) as live, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{live.url}/v1/load_lora_adapter",
                             json={"lora_name": "sql", "lora_path": adapter_dirs[0]}) as response:
            assert response.status == 200 and "added" in await response.text()
        async with http.post(f"{live.url}/v1/load_lora_adapter", json={"lora_name": "half"}) as response:
            assert response.status == 400 and (await response.json())["error"]["param"] == "lora_path"
        async with http.post(f"{live.url}/v1/load_lora_adapter",
                             json={"lora_name": "sql", "lora_path": adapter_dirs[1]}) as response:
            assert response.status == 400  # the name is taken
        async with http.post(f"{live.url}/v1/load_lora_adapter",
                             json={"lora_name": "bad", "lora_path": "/nonexistent"}) as response:
            assert response.status == 400 and "adapter_config.json" in (await response.json())["error"]["message"]
        async with http.post(f"{live.url}/v1/completions",
                             json={"model": "sql", "prompt": PROMPT, "max_tokens": 3}) as response:
            assert response.status == 200
        async with http.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "sql"}) as response:
            assert response.status == 200
        async with http.post(f"{live.url}/v1/completions",
                             json={"model": "sql", "prompt": PROMPT, "max_tokens": 3}) as response:
            assert response.status == 404
        async with http.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "sql"}) as response:
            assert response.status == 404


async def test_runtime_loading_and_unloading_over_two_tensor_parallel_ranks(model_path, adapter_dirs):
    """Adapters loaded while serving reach both ranks (with the step that first runs them): each gives one
    process's tokens; an unloaded one is a 404 and loads again into a slot."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    names = {"sql": adapter_dirs[0], "chat": adapter_dirs[1]}
    one = LLM(model_path, device="cpu", num_gpu_blocks_override=128, **LORA)
    expected = {name: one.llm_engine.tokenizer.decode(
        one.generate(PROMPT, params, use_tqdm=False, lora_request=LoRARequest(name, index + 1, path))[0]
        .outputs[0].token_ids, skip_special_tokens=True) for index, (name, path) in enumerate(names.items())}

    async def complete(http, url, name):
        body = {"model": name, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        async with http.post(f"{url}/v1/completions", json=body) as response:
            return response.status, (await response.json()).get("choices", [{}])[0].get("text")

    async with live_server(model_path, {"allow_runtime_lora_updating": True}, tensor_parallel_size=2,
                           num_gpu_blocks_override=64, **LORA) as live, aiohttp.ClientSession() as http:
        try:
            for name, path in names.items():
                async with http.post(f"{live.url}/v1/load_lora_adapter",
                                     json={"lora_name": name, "lora_path": path}) as response:
                    assert response.status == 200
            assert [await complete(http, live.url, name) for name in names] == [(200, expected[n]) for n in names]
            async with http.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "sql"}) as response:
                assert response.status == 200
            assert (await complete(http, live.url, "sql"))[0] == 404
            async with http.post(f"{live.url}/v1/load_lora_adapter",
                                 json={"lora_name": "sql", "lora_path": names["sql"]}) as response:
                assert response.status == 200
            assert await complete(http, live.url, "sql") == (200, expected["sql"])
        finally:
            live.engine.shutdown()


async def test_without_enable_lora_the_routes_say_how(server):
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v1/load_lora_adapter",
                             json={"lora_name": "x", "lora_path": "/x"}) as response:
            assert response.status == 400 and "--enable-lora" in (await response.json())["error"]["message"]


async def test_a_folder_of_lora_dir_is_served_on_first_use(model_path, adapter_dirs, tmp_path):
    import shutil
    shutil.copytree(adapter_dirs[0], tmp_path / "mine")
    (tmp_path / "empty").mkdir()
    async with live_server(model_path, {"lora_dir": str(tmp_path)}, **LORA) as live, \
            aiohttp.ClientSession() as http:
        async with http.get(f"{live.url}/v1/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == [MODEL_NAME]
        for name, status in (("mine", 200), ("empty", 404), ("../mine", 404), (".hidden", 404)):
            async with http.post(f"{live.url}/v1/completions",
                                 json={"model": name, "prompt": PROMPT, "max_tokens": 3}) as response:
                assert response.status == status, name
        async with http.get(f"{live.url}/v1/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == [MODEL_NAME, "mine"]
