"""max_loaded_slots: loading one slot too many first unloads the least recently used idle one."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.conftest import Hal0


@pytest.mark.llama
def test_a_slot_beyond_the_cap_swaps_out_the_least_recently_used(hal0: Hal0,
                                                                  model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.write_slot_config("a", 'type = "chat"\nmodel = "tiny"\n')
    hal0.write_slot_config("b", 'type = "chat"\nmodel = "tiny"\n')
    hal0.start(env={"HAL0_MAX_LOADED_SLOTS": "1"})
    client = openai.OpenAI(base_url=f"{hal0.url}/v1", api_key="x", max_retries=0)

    def ask(slot: str) -> None:
        client.completions.create(model=slot, prompt="hi", max_tokens=2)

    ask("a")
    assert hal0.slot("a")["state"] in ("ready", "serving")
    for current, other in (("b", "a"), ("a", "b"), ("b", "a")):
        ask(current)
        assert hal0.slot(current)["state"] in ("ready", "serving")
        gone = hal0.slot(other)
        assert gone["state"] == "offline"
        assert "make room for slot " + current in gone["reason"]
    assert hal0.slot("primary")["state"] == "offline"
