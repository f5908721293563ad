"""Settings for every process, read once from the environment and `.env`.

Every field is documented in `.env.example`; a process builds one `Settings` in `main()` and
passes it down explicitly.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET_MIN = 32
MIN_CLAIM_IDLE_MS = 1000


def parse_adapters(spec: str) -> dict[str, str]:
    """Parse ``"house=models/house-smollm2,other=/path"`` into ``{name: path}``."""
    adapters: dict[str, str] = {}
    for item in spec.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"adapter {item!r} is not of the form name=path")
        if name.strip() == "__base__":
            raise ValueError("'__base__' is reserved for the base model")
        adapters[name.strip()] = path.strip()
    return adapters


def parse_ids(spec: str) -> frozenset[str]:
    """Parse a comma-separated list of user or chat ids."""
    return frozenset(part.strip() for part in spec.split(",") if part.strip())


class Settings(BaseSettings):
    """All configuration; names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = None
    key_prefix: str = "house"
    redis_connect_retries: int = 5
    redis_retry_delay_s: float = 1.0

    # Frontends
    telegram_token: SecretStr | None = None
    telegram_api_url: str = "https://api.telegram.org/bot"
    telegram_webhook_url: str | None = None
    telegram_webhook_port: int = 8443
    telegram_webhook_listen: str = "127.0.0.1"
    telegram_webhook_secret: SecretStr | None = None
    telegram_poll_timeout_s: int = 30
    telegram_overall_rate: float = 30.0  # messages per second, whole bot (Telegram's limit)
    telegram_group_rate: float = 20.0  # messages per minute in one group (Telegram's limit)
    telegram_max_retries: int = 3  # retries of a request answered 429 RetryAfter
    discord_token: SecretStr | None = None
    discord_group_history: Literal["per_user", "shared"] = "shared"
    discord_sync_commands: bool = True
    typing_interval_s: float = 4.0
    allowed_users: str = ""
    allowed_chats: str = ""
    admin_ids: str = ""
    group_history: Literal["per_user", "shared"] = "per_user"
    bot_names: str = "House,Dr. House,Dr House"
    user_rate_limit: int = 6
    user_rate_window_s: int = 30
    max_message_chars: int = 4000
    reply_timeout_s: float = 120.0

    # Model
    base_model: str = "smollm2-135m"
    adapters: str = "house=models/house-smollm2"
    default_adapter: str = "house"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_in_4bit: bool = False
    model_cache_dir: Path = ROOT / ".cache" / "models"
    persona: str = "house"
    torch_threads: int = 0
    prefix_cache: bool = True
    # "continuous": one running batch that requests join and leave at each decode step
    # (engine/continuous.py); "batched": one generate() per micro-batch (engine/generation.py).
    local_engine: Literal["continuous", "batched"] = "continuous"
    max_running_rows: int = 32
    # The continuous engine on a CPU float model: one merged copy of the model per adapter
    # (its rows run without peft's per-row LoRA path; same text; +1 model copy per adapter).
    merge_adapters: bool = True

    # Where the model runs: "local" (this process: transformers + peft, the engines above) or
    # "openai" (an OpenAI-compatible server: vLLM, llama.cpp's server, Ollama).
    generation_backend: Literal["local", "openai"] = "local"
    inference_url: str = "http://127.0.0.1:8000/v1"
    inference_api_key: SecretStr | None = None
    # adapter=served model name; __base__ is the base model as the server names it.
    adapter_models: str = "house=house,__base__=smollm2-135m"
    inference_max_in_flight: int = 64
    # One served model at a time in the server's batches (vLLM's CPU build mixes up LoRA and
    # base rows of one batch); false for servers that batch adapters right (vLLM on a GPU).
    inference_separate_adapters: bool = True

    # Generation overrides (empty = the persona pack's default)
    gen_max_new_tokens: int | None = None
    gen_temperature: float | None = None
    gen_top_p: float | None = None
    gen_repetition_penalty: float | None = None
    gen_no_repeat_ngram_size: int | None = None
    gen_sentence_cap: int | None = None
    gen_candidates: int | None = None
    # Reranks the candidates by the persona classifier (models/persona-classifier); "none"
    # keeps the first acceptable candidate.
    reranker: Literal["persona", "none"] = "persona"

    # Reply choice (persona/reply_choice.py): House's real lines compete with the generations
    reply_mode: Literal["generated", "canon", "hybrid"] = "hybrid"
    selector_dir: Path = ROOT / "models" / "house-selector"
    house_data: Path = ROOT.parent / "shared" / "data" / "house" / "questions_answers.csv"
    data_dir: Path = ROOT / "data" / "prepared"
    canon_candidates: int = 4
    canon_repeat_window: int = 50
    # The listener (engine/listener.py): the House model's PMI of a reply given the
    # conversation re-ranks the selector's CANON_SHORTLIST best lines and joins the fit score
    # (fit = cosine + LISTENER_WEIGHT / 20 x PMI). "none": the selector's cosine alone.
    listener: Literal["pmi", "none"] = "pmi"
    listener_weight: float = 1.0
    canon_shortlist: int = 10
    refine_examples: int = 0
    # Streamed replies: the worker publishes the text so far while it generates, and the
    # Telegram and Discord frontends send it at once and edit it to the final reply.
    stream_replies: bool = True

    # History
    history_token_budget: int = 384
    history_max_turns: int = 20
    history_ttl_s: int = 7 * 24 * 3600

    # Worker
    worker_name: str = ""  # empty: host name and process id
    read_block_ms: int = 1000  # how long one read of the request stream waits (and shutdown)
    batch_size: int = 16
    batch_wait_ms: int = 30
    generation_timeout_s: float = 120.0
    claim_idle_ms: int = 60_000
    max_deliveries: int = 3
    max_queue_depth: int = 200
    stream_maxlen: int = 10_000
    worker_metrics_port: int = 9100
    worker_metrics_host: str = "127.0.0.1"
    frontend_metrics_port: int = 0
    log_level: str = "INFO"

    @field_validator("selector_dir", "house_data", "data_dir", "model_cache_dir")
    @classmethod
    def _from_root(cls, value: Path) -> Path:
        """Relative paths start at the project root, whatever the working directory."""
        return value if value.is_absolute() else Path(os.path.normpath(ROOT / value))

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, value: str) -> str:
        parse_adapters(value)
        return value

    @cached_property
    def adapter_paths(self) -> dict[str, str]:
        """Configured adapters as ``{name: path}``; relative paths start at the project root."""
        resolved = {}
        for name, path in parse_adapters(self.adapters).items():
            p = Path(path)
            resolved[name] = str(p if p.is_absolute() or not (ROOT / p).exists() else ROOT / p)
        return resolved

    @cached_property
    def allowed_user_ids(self) -> frozenset[str]:
        return parse_ids(self.allowed_users)

    @cached_property
    def allowed_chat_ids(self) -> frozenset[str]:
        return parse_ids(self.allowed_chats)

    @cached_property
    def admin_user_ids(self) -> frozenset[str]:
        return parse_ids(self.admin_ids)

    @cached_property
    def bot_name_list(self) -> list[str]:
        return [n.strip() for n in self.bot_names.split(",") if n.strip()]

    def webhook_problem(self) -> str | None:
        """Why webhook mode must not start, or None. Without a secret anyone who finds the
        URL can post forged updates (act as any user: /forget them, pass the allow-list)."""
        if not self.telegram_webhook_url:
            return None
        secret = self.telegram_webhook_secret
        if secret is None or len(secret.get_secret_value()) < WEBHOOK_SECRET_MIN:
            return (f"TELEGRAM_WEBHOOK_URL is set: webhook mode needs TELEGRAM_WEBHOOK_SECRET "
                    f"of at least {WEBHOOK_SECRET_MIN} characters (e.g. the output of "
                    "`openssl rand -hex 24`), or unset TELEGRAM_WEBHOOK_URL to poll")
        return None

    def lease_problem(self) -> str | None:
        """Why a worker must not start with these timings, or None. A worker renews its lease
        on the batch it holds every third of CLAIM_IDLE_MS, so a generation may outlast the
        claim time; but below a second a slow Redis round trip lets another worker take a batch
        still being answered (answered twice), and a generation allowed to run past the
        frontends' REPLY_TIMEOUT_S answers users who were already told it took too long."""
        if self.claim_idle_ms < MIN_CLAIM_IDLE_MS:
            return (f"CLAIM_IDLE_MS={self.claim_idle_ms} is too short: a worker renews its "
                    f"lease every third of it; use at least {MIN_CLAIM_IDLE_MS}")
        if not 0 < self.generation_timeout_s <= self.reply_timeout_s:
            return (f"GENERATION_TIMEOUT_S={self.generation_timeout_s:g} must be above 0 and "
                    f"at most REPLY_TIMEOUT_S={self.reply_timeout_s:g} (after that the "
                    "frontend has told the user it took too long)")
        return None

    def generation_overrides(self) -> dict[str, float | int]:
        """The GEN_* settings that are set, keyed like the persona's controls."""
        fields = {
            "max_new_tokens": self.gen_max_new_tokens,
            "temperature": self.gen_temperature,
            "top_p": self.gen_top_p,
            "repetition_penalty": self.gen_repetition_penalty,
            "no_repeat_ngram_size": self.gen_no_repeat_ngram_size,
            "sentence_cap": self.gen_sentence_cap,
            "candidates": self.gen_candidates,
        }
        return {k: v for k, v in fields.items() if v is not None}


def mask_secret(text: str, settings: Settings) -> str:
    """Replace any configured token inside ``text`` with ``***``."""
    for secret in (settings.telegram_token, settings.discord_token,
                   settings.telegram_webhook_secret, settings.redis_password,
                   settings.inference_api_key):
        if secret is not None and secret.get_secret_value():
            text = text.replace(secret.get_secret_value(), "***")
    return text

