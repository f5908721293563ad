"""Settings for every process, read once from the environment and `.env`.

`Settings` is nested by component: ``settings.redis.url``, ``settings.worker.batch_size``,
``settings.generation.temperature``, … Each group is a pydantic-settings class whose fields read
the environment variable named by their ``validation_alias`` — the flat names users set
(``REDIS_URL``, ``BATCH_SIZE``, ``GEN_TEMPERATURE``); the nesting changes no variable's name.
Every setting is documented in `.env.example`, in sections named like the groups; a process
builds one `Settings` in `main()` and passes it down explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cache, cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.sources import DotenvType

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET_MIN = 32
MIN_CLAIM_IDLE_MS = 1000
ENV_FILE = ".env"


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


def from_root(value: Path) -> Path:
    """Relative paths start at the project root, whatever the working directory."""
    return value if value.is_absolute() else Path(os.path.normpath(ROOT / value))


RootPath = Annotated[Path, AfterValidator(from_root)]


def _none_word(value: Any) -> Any:
    """ "none" or nothing (an environment variable can only be a string) means None."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value



class SettingsGroup(BaseSettings):
    """One component's settings. A field reads the environment variable (and `.env` line)
    named by its ``validation_alias``, case-insensitively; anything else in the environment
    or `.env` is ignored. Field names do not name variables (``url`` is read from REDIS_URL
    only, never from URL)."""

    model_config = SettingsConfigDict(env_file=ENV_FILE, env_file_encoding="utf-8",
                                      extra="ignore")


class RedisSettings(SettingsGroup):
    """Redis and the request and reply streams in it (frontends and workers alike)."""

    url: str = Field("redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    password: SecretStr | None = Field(None, validation_alias="REDIS_PASSWORD")
    key_prefix: str = Field("house", validation_alias="KEY_PREFIX")
    connect_retries: int = Field(5, validation_alias="REDIS_CONNECT_RETRIES")
    retry_delay_s: float = Field(1.0, validation_alias="REDIS_RETRY_DELAY_S")
    max_queue_depth: int = Field(200, validation_alias="MAX_QUEUE_DEPTH")
    stream_maxlen: int = Field(10_000, validation_alias="STREAM_MAXLEN")


class TelegramSettings(SettingsGroup):
    """The Telegram frontend."""

    token: SecretStr | None = Field(None, validation_alias="TELEGRAM_TOKEN")
    api_url: str = Field("https://api.telegram.org/bot", validation_alias="TELEGRAM_API_URL")
    webhook_url: str | None = Field(None, validation_alias="TELEGRAM_WEBHOOK_URL")
    webhook_port: int = Field(8443, validation_alias="TELEGRAM_WEBHOOK_PORT")
    webhook_listen: str = Field("127.0.0.1", validation_alias="TELEGRAM_WEBHOOK_LISTEN")
    webhook_secret: SecretStr | None = Field(None, validation_alias="TELEGRAM_WEBHOOK_SECRET")
    poll_timeout_s: int = Field(30, validation_alias="TELEGRAM_POLL_TIMEOUT_S")
    # messages per second, whole bot (Telegram's limit)
    overall_rate: float = Field(30.0, validation_alias="TELEGRAM_OVERALL_RATE")
    # messages per minute in one group (Telegram's limit)
    group_rate: float = Field(20.0, validation_alias="TELEGRAM_GROUP_RATE")
    # retries of a request answered 429 RetryAfter
    max_retries: int = Field(3, validation_alias="TELEGRAM_MAX_RETRIES")

    def webhook_problem(self) -> str | None:
        """Why webhook mode must not start, or None. Without a secret anyone who finds the
        URL can post forged updates (act as any user: /forget them, pass the allow-list)."""
        if not self.webhook_url:
            return None
        secret = self.webhook_secret
        if secret is None or len(secret.get_secret_value()) < WEBHOOK_SECRET_MIN:
            return (f"TELEGRAM_WEBHOOK_URL is set: webhook mode needs TELEGRAM_WEBHOOK_SECRET "
                    f"of at least {WEBHOOK_SECRET_MIN} characters (e.g. the output of "
                    "`openssl rand -hex 24`), or unset TELEGRAM_WEBHOOK_URL to poll")
        return None


class DiscordSettings(SettingsGroup):
    """The Discord frontend."""

    token: SecretStr | None = Field(None, validation_alias="DISCORD_TOKEN")
    group_history: Literal["per_user", "shared"] = Field(
        "shared", validation_alias="DISCORD_GROUP_HISTORY")
    sync_commands: bool = Field(True, validation_alias="DISCORD_SYNC_COMMANDS")


class FrontendSettings(SettingsGroup):
    """What every chat frontend (Telegram, Discord, the console) shares: who may talk, rate
    limits, timeouts, streamed replies."""

    typing_interval_s: float = Field(4.0, validation_alias="TYPING_INTERVAL_S")
    allowed_users: str = Field("", validation_alias="ALLOWED_USERS")
    allowed_chats: str = Field("", validation_alias="ALLOWED_CHATS")
    admin_ids: str = Field("", validation_alias="ADMIN_IDS")
    group_history: Literal["per_user", "shared"] = Field(
        "per_user", validation_alias="GROUP_HISTORY")
    bot_names: str = Field("House,Dr. House,Dr House", validation_alias="BOT_NAMES")
    user_rate_limit: int = Field(6, validation_alias="USER_RATE_LIMIT")
    user_rate_window_s: int = Field(30, validation_alias="USER_RATE_WINDOW_S")
    max_message_chars: int = Field(4000, validation_alias="MAX_MESSAGE_CHARS")
    reply_timeout_s: float = Field(120.0, validation_alias="REPLY_TIMEOUT_S")
    # Streamed replies: the worker publishes the text so far while it generates, and the
    # Telegram and Discord frontends send it at once and edit it to the final reply.
    stream_replies: bool = Field(True, validation_alias="STREAM_REPLIES")
    metrics_port: int = Field(0, validation_alias="FRONTEND_METRICS_PORT")

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


class ModelSettings(SettingsGroup):
    """The model a worker runs in its own process (the "local" backend) and its adapters."""

    base_model: str = Field("smollm2-135m", validation_alias="BASE_MODEL")
    adapters: str = Field("house=models/house-smollm2", validation_alias="ADAPTERS")
    default_adapter: str = Field("house", validation_alias="DEFAULT_ADAPTER")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", validation_alias="DEVICE")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", validation_alias="DTYPE")
    load_in_4bit: bool = Field(False, validation_alias="LOAD_IN_4BIT")
    cache_dir: RootPath = Field(ROOT / ".cache" / "models", validation_alias="MODEL_CACHE_DIR")
    # llama.cpp's threads where it serves (torch keeps one: `settle_torch_threads`), else torch's
    torch_threads: int = Field(0, validation_alias="TORCH_THREADS")
    prefix_cache: bool = Field(True, validation_alias="PREFIX_CACHE")
    # "llamacpp": the continuous scheduler on llama.cpp (engine/llamacpp_engine.py);
    # "continuous": the same on PyTorch (engine/continuous.py); "batched": one generate() per
    # micro-batch (engine/generation.py); "auto": llamacpp for the embedded GGUF model on a CPU
    # where llama-cpp-python is installed, else continuous.
    local_engine: Literal["auto", "llamacpp", "continuous", "batched"] = Field(
        "auto", validation_alias="LOCAL_ENGINE")
    max_running_rows: int = Field(32, validation_alias="MAX_RUNNING_ROWS")
    # The continuous engine on a CPU float model: one merged copy of the model per adapter
    # (its rows run without peft's per-row LoRA path; same text; +1 model copy per adapter).
    merge_adapters: bool = Field(True, validation_alias="MERGE_ADAPTERS")
    # The llama.cpp engine: which GGUF weights ("auto": bf16 on a CPU with native bf16 and no
    # AMX, else q8_0; "source": the embedded file's own type), each adapter merged into its own
    # file or applied at run time, and the key/value cells of each adapter's context.
    llamacpp_weights: Literal["auto", "q8_0", "bf16", "f16", "f32", "source"] = Field(
        "auto", validation_alias="LLAMACPP_WEIGHTS")
    llamacpp_lora: Literal["merged", "runtime"] = Field("merged", validation_alias="LLAMACPP_LORA")
    # Whether llama.cpp repacks the weights for its AMX / interleaved kernels at load ("auto":
    # not where the build uses AMX, whose path segfaults on this project's Xeon VMs).
    llamacpp_repack: Literal["auto", "on", "off"] = Field(
        "auto", validation_alias="LLAMACPP_REPACK")
    llamacpp_kv_tokens: int = Field(8192, ge=256, validation_alias="LLAMACPP_KV_TOKENS")

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


class InferenceSettings(SettingsGroup):
    """Where the model runs: "local" (this process: transformers + peft, the engines of
    `ModelSettings`) or "openai" (an OpenAI-compatible server: vLLM, llama.cpp's server,
    Ollama)."""

    backend: Literal["local", "openai"] = Field("local", validation_alias="GENERATION_BACKEND")
    url: str = Field("http://127.0.0.1:8000/v1", validation_alias="INFERENCE_URL")
    api_key: SecretStr | None = Field(None, validation_alias="INFERENCE_API_KEY")
    # adapter=served model name; __base__ is the base model as the server names it.
    adapter_models: str = Field("house=house,__base__=smollm2-135m",
                                validation_alias="ADAPTER_MODELS")
    max_in_flight: int = Field(64, validation_alias="INFERENCE_MAX_IN_FLIGHT")
    # One served model at a time in the server's batches (vLLM's CPU build mixes up LoRA and
    # base rows of one batch); false for servers that batch adapters right (vLLM on a GPU).
    separate_adapters: bool = Field(True, validation_alias="INFERENCE_SEPARATE_ADAPTERS")


class GenerationSettings(SettingsGroup):
    """How a reply is generated: the persona pack, overrides of its controls (None = the
    pack's value) and how the candidates are ranked."""

    persona: str = Field("house", validation_alias="PERSONA")
    max_new_tokens: int | None = Field(None, validation_alias="GEN_MAX_NEW_TOKENS")
    temperature: float | None = Field(None, validation_alias="GEN_TEMPERATURE")
    top_p: float | None = Field(None, validation_alias="GEN_TOP_P")
    repetition_penalty: float | None = Field(None, validation_alias="GEN_REPETITION_PENALTY")
    no_repeat_ngram_size: int | None = Field(None, validation_alias="GEN_NO_REPEAT_NGRAM_SIZE")
    sentence_cap: int | None = Field(None, validation_alias="GEN_SENTENCE_CAP")
    candidates: int | None = Field(None, validation_alias="GEN_CANDIDATES")
    # Reranks the candidates by the persona classifier (models/persona-classifier); "none"
    # keeps the first acceptable candidate.
    reranker: Literal["persona", "none"] = Field("persona", validation_alias="RERANKER")

    def overrides(self) -> dict[str, float | int]:
        """The GEN_* settings that are set, keyed like the persona's controls."""
        fields = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "sentence_cap": self.sentence_cap,
            "candidates": self.candidates,
        }
        return {k: v for k, v in fields.items() if v is not None}


class ReplyChoiceSettings(SettingsGroup):
    """Reply choice (persona/reply_choice.py): House's real lines compete with the
    generations; the data they come from."""

    mode: Literal["generated", "canon", "hybrid"] = Field("hybrid", validation_alias="REPLY_MODE")
    # A user's own complaint that the pack's differentials name (a butterfly rash, a fever and a
    # stiff neck) gets House's answer to it, written for the bot, whatever the mode.
    differentials: bool = Field(True, validation_alias="DIFFERENTIALS")
    # A question about House, his people or small talk that the pack's topics name ("Do you miss
    # Kutner?", "cats or dogs?") gets his answer to it, written for the bot, whatever the mode.
    topics: bool = Field(True, validation_alias="TOPICS")
    selector_dir: RootPath = Field(ROOT / "models" / "house-selector",
                                   validation_alias="SELECTOR_DIR")
    house_data: RootPath = Field(
        ROOT.parent / "shared" / "data" / "house" / "questions_answers.csv",
        validation_alias="HOUSE_DATA")
    data_dir: RootPath = Field(ROOT / "data" / "prepared", validation_alias="DATA_DIR")
    canon_candidates: int = Field(4, validation_alias="CANON_CANDIDATES")
    canon_repeat_window: int = Field(50, validation_alias="CANON_REPEAT_WINDOW")
    # The listener (engine/listener.py): the House model's PMI of a reply given the
    # conversation re-ranks the selector's CANON_SHORTLIST best lines and joins the fit score
    # (fit = cosine + LISTENER_WEIGHT / 20 x PMI). "none": the selector's cosine alone.
    listener: Literal["pmi", "none"] = Field("pmi", validation_alias="LISTENER")
    listener_weight: float = Field(1.0, validation_alias="LISTENER_WEIGHT")
    # 6 (was 10): the same Recall@1 on 300 test messages with 16 listener tokens, and a hybrid
    # reply in a conversation within 3-14 % of a generated one (docs/reply-choice.md)
    canon_shortlist: int = Field(6, validation_alias="CANON_SHORTLIST")
    # A canon line's score adds this weight x the likeness of the message to what was said to
    # House before the line (the earlier retrieval bot's signal); 0: the selector alone.
    canon_anchor_weight: float = Field(0.5, ge=0, validation_alias="CANON_ANCHOR_WEIGHT")
    # A canon line's score adds this weight x its length in words, up to 12, as a share: a
    # few words out of their scene carry little of House (persona/canon.py:length_prior;
    # 0.1 won 64 % of blind A/B readings against 0, docs/reply-choice.md).
    canon_length_weight: float = Field(0.1, ge=0, validation_alias="CANON_LENGTH_WEIGHT")
    # A canon line's score loses this weight (once) where it is about a third person ("he",
    # "her") the conversation never brought up, or where House speaks of himself to a message
    # that does not speak to him (persona/canon.py; 0.05 won 59.5 % of 74 blind A/B readings
    # against 0, docs/reply-choice.md; 0: who a line is about plays no part).
    canon_person_weight: float = Field(0.05, ge=0, validation_alias="CANON_PERSON_WEIGHT")
    # The listener scores only a reply's first LISTENER_TOKENS tokens (its cost is their sum).
    listener_tokens: int = Field(16, ge=1, validation_alias="LISTENER_TOKENS")
    # The listener hears the last LISTENER_EXCHANGES exchanges of the conversation before the
    # message (as it was measured: the selector's context), not the whole history: its cost
    # then stays that of a conversation's first messages (docs/reply-choice.md).
    listener_exchanges: int = Field(1, ge=0, validation_alias="LISTENER_EXCHANGES")
    # Under load the listener steps aside: with at least this many other requests in the
    # worker's hands (being answered, or read and waiting), or that many messages of other
    # conversations taken within the last second, the selector's cosine alone ranks the canon
    # lines (0: always listen).
    listener_busy_requests: int = Field(8, ge=0, validation_alias="LISTENER_BUSY_REQUESTS")
    # With fewer other requests in hand, but some, it re-ranks only this many of the shortlist
    # (0: the whole CANON_SHORTLIST).
    listener_busy_shortlist: int = Field(5, ge=0, validation_alias="LISTENER_BUSY_SHORTLIST")
    # A worker scores the listener's "empty message" term of every canon line while its engine
    # is idle, kept in MODEL_CACHE_DIR/listener (a reply's PMI then costs half).
    listener_prime: bool = Field(True, validation_alias="LISTENER_PRIME")
    refine_examples: int = Field(0, validation_alias="REFINE_EXAMPLES")
    # Hybrid replies generate only when House's best line is unsure: a canon line whose fit
    # reaches HYBRID_SURE_FIT (cosine + the listener's term) or, while the listener steps
    # aside, HYBRID_SURE_COSINE (the selector's cosine alone) is the reply before anything is
    # generated. Each sits below the 5th percentile of the best line's fit on its scale, so
    # about one message in fifty still generates and competes (docs/reply-choice.md).
    # "none": always generate and compete.
    hybrid_sure_fit: Annotated[float | None, BeforeValidator(_none_word)] = Field(
        0.7, validation_alias="HYBRID_SURE_FIT")
    hybrid_sure_cosine: Annotated[float | None, BeforeValidator(_none_word)] = Field(
        0.55, validation_alias="HYBRID_SURE_COSINE")


class HistorySettings(SettingsGroup):
    """Conversation history in Redis and how much of it goes into a prompt."""

    token_budget: int = Field(384, validation_alias="HISTORY_TOKEN_BUDGET")
    max_turns: int = Field(20, validation_alias="HISTORY_MAX_TURNS")
    ttl_s: int = Field(7 * 24 * 3600, validation_alias="HISTORY_TTL_S")


class WorkerSettings(SettingsGroup):
    """A worker: its name, micro-batches, timeouts and leases, metrics."""

    name: str = Field("", validation_alias="WORKER_NAME")  # empty: host name and process id
    # how long one read of the request stream waits (and shutdown)
    read_block_ms: int = Field(1000, validation_alias="READ_BLOCK_MS")
    batch_size: int = Field(16, validation_alias="BATCH_SIZE")
    batch_wait_ms: int = Field(30, validation_alias="BATCH_WAIT_MS")
    generation_timeout_s: float = Field(120.0, validation_alias="GENERATION_TIMEOUT_S")
    claim_idle_ms: int = Field(60_000, validation_alias="CLAIM_IDLE_MS")
    max_deliveries: int = Field(3, validation_alias="MAX_DELIVERIES")
    metrics_port: int = Field(9100, validation_alias="WORKER_METRICS_PORT")
    metrics_host: str = Field("127.0.0.1", validation_alias="WORKER_METRICS_HOST")


class LogSettings(SettingsGroup):
    """Logging, for every process."""

    level: str = Field("INFO", validation_alias="LOG_LEVEL")


class Settings(BaseModel):
    """All configuration, one group per component.

    ``Settings()`` reads every group from the environment and `.env`; ``_env_file`` names
    another file (None: the environment only). Keyword arguments override single settings by
    their environment names in lower case, as a flat list (``Settings(batch_size=4,
    redis_url=…)`` sets ``settings.worker.batch_size`` and ``settings.redis.url``), or give a
    whole group (``worker=WorkerSettings(...)``, or a dict as ``model_dump()`` writes it).
    `with_overrides` changes settings of a copy by the same names.
    """

    model_config = ConfigDict(extra="forbid")

    redis: RedisSettings
    telegram: TelegramSettings
    discord: DiscordSettings
    frontend: FrontendSettings
    model: ModelSettings
    inference: InferenceSettings
    generation: GenerationSettings
    reply_choice: ReplyChoiceSettings
    history: HistorySettings
    worker: WorkerSettings
    log: LogSettings

    def __init__(self, /, _env_file: DotenvType | None = ENV_FILE, **values: Any) -> None:
        groups = {name: values.pop(name) for name in list(values) if name in _group_classes()}
        changes = _by_group(values)
        for name, group_class in _group_classes().items():
            if isinstance(groups.get(name), dict):  # as `model_dump()` writes it
                groups[name] = _validated(group_class, groups[name], {})
            if name in groups:
                groups[name] = _rebuild(groups[name], changes.get(name, {}))
            else:
                groups[name] = group_class(_env_file=_env_file,  # type: ignore[call-arg]
                                           **changes.get(name, {}))
        super().__init__(**groups)

    def with_overrides(self, **values: Any) -> Settings:
        """A copy with some settings changed, named as in `Settings()` (``reply_mode="canon"``);
        the groups they belong to are validated again (and their cached properties
        recomputed). The environment is not read again."""
        return self.model_copy(update={name: _rebuild(getattr(self, name), group_changes)
                                       for name, group_changes in _by_group(values).items()})

    @staticmethod
    def env_fields() -> Iterator[tuple[str, str, str, FieldInfo]]:
        """Every setting as ``(ENV_NAME, group, field name, field info)``, group by group."""
        for group, group_class in _group_classes().items():
            for name, info in group_class.model_fields.items():
                yield str(info.validation_alias), group, name, info

    def lease_problem(self) -> str | None:
        """Why a worker must not start with these timings, or None. A worker renews its lease
        on the batch it holds every third of CLAIM_IDLE_MS, so a generation may outlast the
        claim time; but below a second a slow Redis round trip lets another worker take a batch
        still being answered (answered twice), and a generation allowed to run past the
        frontends' REPLY_TIMEOUT_S answers users who were already told it took too long."""
        worker, reply_timeout_s = self.worker, self.frontend.reply_timeout_s
        if worker.claim_idle_ms < MIN_CLAIM_IDLE_MS:
            return (f"CLAIM_IDLE_MS={worker.claim_idle_ms} is too short: a worker renews its "
                    f"lease every third of it; use at least {MIN_CLAIM_IDLE_MS}")
        if not 0 < worker.generation_timeout_s <= reply_timeout_s:
            return (f"GENERATION_TIMEOUT_S={worker.generation_timeout_s:g} must be above 0 and "
                    f"at most REPLY_TIMEOUT_S={reply_timeout_s:g} (after that the "
                    "frontend has told the user it took too long)")
        return None


@cache
def _group_classes() -> dict[str, type[SettingsGroup]]:
    """``{group name: its settings class}`` in declaration order."""
    return {name: info.annotation for name, info in Settings.model_fields.items()}  # type: ignore[misc]


@cache
def _env_index() -> dict[str, tuple[str, str]]:
    """``{ENV_NAME: (group, field name)}``."""
    return {env: (group, name) for env, group, name, _ in Settings.env_fields()}


def _by_group(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat settings (``batch_size=4``) sorted into their groups, keyed by environment name."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        env = key.upper()
        if env not in _env_index():
            raise TypeError(f"there is no setting {key!r}: settings are named like their "
                            "environment variables, in lower case (batch_size, redis_url, …)")
        groups.setdefault(_env_index()[env][0], {})[env] = value
    return groups


def _validated(group_class: type[SettingsGroup], fields: dict[str, Any],
               changes: dict[str, Any]) -> SettingsGroup:
    """A group from values keyed by field name and ``changes`` keyed by environment name,
    validated (without reading the environment). Validation takes only the environment names:
    accepting field names too would make pydantic-settings read variables named like the
    fields (URL, TOKEN)."""
    aliases = {name: str(info.validation_alias) for name, info in group_class.model_fields.items()}
    if unknown := sorted(fields.keys() - aliases.keys()):
        raise TypeError(f"{group_class.__name__} has no field {', '.join(unknown)}")
    return group_class.model_validate({**{aliases[k]: v for k, v in fields.items()}, **changes})


def _rebuild(group: SettingsGroup, changes: dict[str, Any]) -> SettingsGroup:
    """``group`` with ``changes`` (keyed by environment name), validated again."""
    if not changes:
        return group
    return _validated(type(group), {name: getattr(group, name)
                                    for name in type(group).model_fields}, changes)


def mask_secret(text: str, settings: Settings) -> str:
    """Replace any configured token inside ``text`` with ``***``."""
    for secret in (settings.telegram.token, settings.discord.token,
                   settings.telegram.webhook_secret, settings.redis.password,
                   settings.inference.api_key):
        if secret is not None and secret.get_secret_value():
            text = text.replace(secret.get_secret_value(), "***")
    return text
