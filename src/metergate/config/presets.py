"""Presets for OpenAI-compatible providers: `type: openai` plus `preset: NAME`.

A preset fills what an operator would otherwise look up: the base URL, whether a key is
needed, and the shipped price list its models are priced from (each list carries its
source and date, see `metering/provider_prices.yaml`). Anything set in the config wins.
The wire quirks of each service are handled in `providers.compatible`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PresetName = Literal[
    "deepseek",
    "mistral",
    "groq",
    "openrouter",
    "together",
    "fireworks",
    "xai",
    "perplexity",
    "holysheep",
    "ollama",
    "vllm",
]


@dataclass(frozen=True, slots=True)
class Preset:
    base_url: str
    price_list: str
    needs_key: bool = True
    key_env: str = ""  # the environment variable its docs name, for hints
    chat_via: Literal["chat", "responses"] = "chat"  # the API chat requests are sent to


PRESETS: dict[str, Preset] = {
    "deepseek": Preset("https://api.deepseek.com/v1", "deepseek", key_env="DEEPSEEK_API_KEY"),
    "mistral": Preset("https://api.mistral.ai/v1", "mistral", key_env="MISTRAL_API_KEY"),
    "groq": Preset("https://api.groq.com/openai/v1", "groq", key_env="GROQ_API_KEY"),
    "openrouter": Preset(
        "https://openrouter.ai/api/v1", "openrouter", key_env="OPENROUTER_API_KEY"
    ),
    "together": Preset("https://api.together.xyz/v1", "together", key_env="TOGETHER_API_KEY"),
    "fireworks": Preset(
        "https://api.fireworks.ai/inference/v1", "fireworks", key_env="FIREWORKS_API_KEY"
    ),
    "xai": Preset("https://api.x.ai/v1", "xai", key_env="XAI_API_KEY"),
    # Perplexity retired its Sonar chat completions API on 2026-09-27: its Agent API
    # speaks OpenAI's Responses format (`/v1/responses`), and chat is translated to it.
    "perplexity": Preset(
        "https://api.perplexity.ai/v1",
        "perplexity",
        key_env="PERPLEXITY_API_KEY",
        chat_via="responses",
    ),
    "holysheep": Preset("https://api.holysheep.ai/v1", "holysheep", key_env="HOLYSHEEP_API_KEY"),
    # Local servers: no key by default, and their tokens cost nothing.
    "ollama": Preset("http://127.0.0.1:11434/v1", "free", needs_key=False),
    "vllm": Preset("http://127.0.0.1:8000/v1", "free", needs_key=False),
}

# The price list of the cloud provider types when the config names none.
DEFAULT_PRICE_LISTS: dict[str, Literal["bedrock", "vertex"]] = {
    "bedrock": "bedrock",
    "vertex": "vertex",
}
