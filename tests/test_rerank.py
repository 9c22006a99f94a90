"""Rerank: a `rerank` slot (llama-server --reranking) answers /v1/rerank and /v1/reranking through hal0.

The generated random-weights model gives meaningless scores; the test checks the path and the shape.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import Hal0


@pytest.mark.llama
def test_a_rerank_slot_answers_both_rerank_paths(hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny-rank", model_files["tiny"])
    hal0.write_slot_config("ranker", 'type = "rerank"\nmodel = "tiny-rank"\naliases = ["my-reranker"]\n')
    hal0.start()
    body = {"query": "a cat", "documents": ["a cat sat", "a dog ran", "cars"]}
    for path, model in (("/v1/rerank", "ranker"), ("/v1/reranking", "my-reranker")):
        resp = hal0.client.post(path, json={**body, "model": model})
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert sorted(r["index"] for r in results) == [0, 1, 2]
        assert all(isinstance(r["relevance_score"], float) for r in results)
    assert hal0.slot("ranker")["state"] in ("ready", "serving")
    # A chat slot is not a reranker: the error says which slot type the endpoint needs.
    hal0.add_model("tiny", model_files["tiny"])
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    wrong = hal0.client.post("/v1/rerank", json={**body, "model": "primary"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_slot_type"
    assert "rerank" in wrong.json()["error"]["message"]


@pytest.mark.llama
def test_identical_concurrent_reranks_share_one_upstream_call(hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny-rank", model_files["tiny"])
    hal0.write_slot_config("ranker", 'type = "rerank"\nmodel = "tiny-rank"\n')
    hal0.start()
    assert hal0.client.post("/api/slots/ranker/load").status_code == 200
    body = {"model": "ranker", "query": "q", "documents": [f"document {i} " * 40 for i in range(24)]}

    async def burst() -> list[bytes]:
        async with httpx.AsyncClient(base_url=hal0.url, timeout=60) as http:
            replies = await asyncio.gather(*(http.post("/v1/rerank", json=body) for _ in range(8)))
        assert all(r.status_code == 200 for r in replies)
        return [r.content for r in replies]

    bodies = asyncio.run(burst())
    assert len(set(bodies)) == 1
    reasons = [d["reason"] for d in hal0.client.get("/api/decisions", params={"slot": "ranker"}).json()["data"]]
    assert any("coalesced" in r for r in reasons), reasons
