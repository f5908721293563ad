"""The nested settings: every group reads the flat environment names users already set (from
the environment and `.env`), anything else there is ignored, and overrides in code use the
same names."""

from __future__ import annotations

from pathlib import Path

import pytest

from base.config import ROOT, Settings, WorkerSettings


def test_environment_and_env_file_land_in_the_nested_groups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BATCH_SIZE", "REDIS_URL", "KEY_PREFIX", "GEN_TEMPERATURE", "REPLY_MODE",
                 "DISCORD_GROUP_HISTORY", "SELECTOR_DIR", "TELEGRAM_POLL_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "BATCH_SIZE=4\nKEY_PREFIX=from-file\nREPLY_MODE=canon\n"
        "DISCORD_GROUP_HISTORY=per_user\nSELECTOR_DIR=models/other-selector\n")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6380/2")
    monkeypatch.setenv("KEY_PREFIX", "from-env")  # the environment wins over .env
    monkeypatch.setenv("GEN_TEMPERATURE", "0.5")
    monkeypatch.setenv("telegram_poll_timeout_s", "7")  # names are case-insensitive
    monkeypatch.chdir(tmp_path)  # `.env` is read from the working directory
    settings = Settings()
    assert settings.worker.batch_size == 4
    assert settings.redis.url == "redis://elsewhere:6380/2"
    assert settings.redis.key_prefix == "from-env"
    assert settings.generation.temperature == 0.5
    assert settings.generation.overrides() == {"temperature": 0.5}
    assert settings.telegram.poll_timeout_s == 7
    assert settings.reply_choice.mode == "canon"
    assert settings.discord.group_history == "per_user"
    assert settings.reply_choice.selector_dir == ROOT / "models" / "other-selector"
    assert Settings(_env_file=None).worker.batch_size == 16  # the file only when asked


def test_unknown_environment_and_field_names_are_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a setting's own environment name sets it: not its field name in the group (``url``,
    ``token``, ``name``), not a group's name, not anything unknown."""
    for name in ("REDIS_URL", "DISCORD_TOKEN", "WORKER_NAME", "BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    env_file = tmp_path / ".env"
    env_file.write_text("NOT_A_SETTING=1\nname=file-worker\nbatch_size_x=3\n")
    monkeypatch.setenv("URL", "redis://wrong:1/0")
    monkeypatch.setenv("TOKEN", "not-the-discord-token")
    monkeypatch.setenv("REDIS", '{"url": "redis://wrong:2/0"}')
    monkeypatch.setenv("HOUSE_SOMETHING_ELSE", "x")
    settings = Settings(_env_file=env_file)
    defaults = Settings(_env_file=None)
    assert settings.redis.url == defaults.redis.url == "redis://127.0.0.1:6379/0"
    assert settings.discord.token is None and settings.telegram.token is None
    assert settings.worker.name == "" and settings.worker.batch_size == 16


def test_every_setting_has_one_unique_environment_name() -> None:
    names = [env for env, *_ in Settings.env_fields()]
    assert len(names) == len(set(names))
    assert all(env.isupper() and env.replace("_", "").isalnum() for env in names)
    groups = {group for _, group, _, _ in Settings.env_fields()}
    assert groups == set(Settings.model_fields)


def test_overrides_use_the_environment_names() -> None:
    settings = Settings(_env_file=None, batch_size=4, redis_url="redis://h:1/0",
                        adapters="house=/elsewhere/house")
    assert settings.worker.batch_size == 4 and settings.redis.url == "redis://h:1/0"
    assert settings.model.adapter_paths == {"house": "/elsewhere/house"}
    copy = settings.with_overrides(batch_size=8, adapters="other=/x")
    assert copy.worker.batch_size == 8 and settings.worker.batch_size == 4
    assert copy.model.adapter_paths == {"other": "/x"}  # cached property recomputed
    assert copy.redis is settings.redis  # untouched groups are shared
    with pytest.raises(TypeError, match="no setting 'batch_sise'"):
        Settings(_env_file=None, batch_sise=4)
    with pytest.raises(ValueError, match="name=path"):
        settings.with_overrides(adapters="no-equals-sign")
    group = Settings(_env_file=None, worker=WorkerSettings(_env_file=None, BATCH_SIZE=2),
                     batch_wait_ms=0)
    assert group.worker.batch_size == 2 and group.worker.batch_wait_ms == 0
    again = Settings(_env_file=None, **{**settings.model_dump(), "batch_size": 5})
    assert again.redis.url == "redis://h:1/0" and again.worker.batch_size == 5
    assert again.model.adapter_paths == {"house": "/elsewhere/house"}
    with pytest.raises(TypeError, match="RedisSettings has no field uri"):
        Settings(_env_file=None, redis={"uri": "redis://h:1/0"})
