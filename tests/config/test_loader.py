"""Settings precedence, validation and the one-line errors users see."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from config import ConfigError, load_settings
from config.paths import bundled_model
from config.settings import schema

UPSTREAM = ["http://127.0.0.1:9/v1/"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_supervise_the_bundled_model_on_loopback() -> None:
    s = load_settings({}, env={})
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.supervise and s.model == bundled_model()
    assert s.model_alias == "SmolLM2-135M-Instruct.Q4_1"
    assert s.llama_server is not None and s.llama_server.name == "llama-server"


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", 'port = 8100\nlog_level = "debug"\nparallel = 3\n')
    env = {"LLAMA_PROXY_PORT": "8200", "LLAMA_PROXY_PARALLEL": "5"}
    s = load_settings({"config": str(cfg), "port": "8300"}, env=env)
    assert s.port == 8300  # flag beats env beats file
    assert s.parallel == 5  # env beats file
    assert s.log_level == "debug"  # file beats default


def test_upstream_mode_turns_supervision_off_and_normalises_urls() -> None:
    s = load_settings({"upstreams": UPSTREAM}, env={})
    assert not s.supervise
    assert s.upstreams == ["http://127.0.0.1:9"]
    both = load_settings({"upstreams": UPSTREAM, "model": str(bundled_model())}, env={})
    assert both.supervise


def test_llama_args_split_like_a_shell() -> None:
    s = load_settings({"llama_args": ["--ctx-size 4096", "--threads=2"]}, env={})
    assert s.llama_args == ["--ctx-size", "4096", "--threads=2"]
    env = load_settings({}, env={"LLAMA_PROXY_LLAMA_ARGS": "-c 512 --mlock"})
    assert env.llama_args == ["-c", "512", "--mlock"]


@pytest.mark.parametrize(
    ("args", "env", "setting"),
    [
        ({"model": "/no/such/model.gguf"}, {}, "model"),
        ({"llama_server": "/no/such/llama-server"}, {}, "llama_server"),
        ({"port": "70000"}, {}, "port"),
        ({"port": "eighty"}, {}, "port"),
        ({}, {"LLAMA_PROXY_PARALLEL": "0"}, "parallel"),
        ({}, {"LLAMA_PROXY_NO_SUCH_THING": "1"}, "LLAMA_PROXY_NO_SUCH_THING"),
        ({"upstreams": ["ftp://example"]}, {}, "upstreams"),
        ({"idle_timeout": "-1"}, {}, "idle_timeout"),
        ({"log_format": "xml"}, {}, "log_format"),
    ],
)
def test_bad_values_name_the_setting(args: dict, env: dict, setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(args, env=env)
    assert err.value.setting == setting
    assert str(err.value).startswith(f"{setting}: ")
    assert "\n" not in str(err.value)


def test_unreadable_binary_is_refused(tmp_path: Path) -> None:
    fake_binary = write(tmp_path / "llama-server", "#!/bin/sh\n")
    fake_binary.chmod(stat.S_IRUSR)
    with pytest.raises(ConfigError, match=r"llama_server: .* is not an executable file"):
        load_settings({"llama_server": str(fake_binary)}, env={})


def test_toml_errors(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", "port = [unclosed\n")
    with pytest.raises(ConfigError, match=r"config: .*bad.toml is not valid TOML"):
        load_settings({"config": str(bad)}, env={})
    unknown = write(tmp_path / "unknown.toml", "prot = 8000\n")
    with pytest.raises(ConfigError, match=r"prot: unknown setting in .*unknown.toml"):
        load_settings({"config": str(unknown)}, env={})
    wrong_type = write(tmp_path / "type.toml", 'port = "x"\n')
    with pytest.raises(ConfigError, match=r"port: 'x' from .* is not a valid int"):
        load_settings({"config": str(wrong_type)}, env={})
    with pytest.raises(ConfigError, match=r"config: .* does not exist"):
        load_settings({"config": str(tmp_path / "missing.toml")}, env={})


def test_config_file_from_env_and_masked_secrets(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", 'upstreams = ["http://127.0.0.1:9"]\n'
                                     'upstream_api_key = "very-secret-key"\n')
    s = load_settings({}, env={"LLAMA_PROXY_CONFIG": str(cfg)})
    assert s.upstream_api_key == "very-secret-key"
    shown = s.masked()
    assert shown["upstream_api_key"] == "***"
    assert "very-secret-key" not in repr(shown)


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "example.toml"
    s = load_settings({"config": str(example)}, env={})
    assert s.port == 8000


def test_a_relative_data_dir_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the embedded Redis's unix:// URL would read it as a host
    s = load_settings({"data_dir": "reldata"}, env={}, serving=False)
    assert s.data_dir == tmp_path / "reldata" and s.data_dir.is_absolute()


def test_the_configuration_reference_is_current() -> None:
    """docs/configuration.md is made from the schema: a new or changed setting without
    `make docs` fails here."""
    from config.reference import render

    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert page.read_text() == render(), "docs/configuration.md is stale: run `make docs`"
    for f in schema():
        assert f"| `{f.name}` |" in page.read_text()


def test_the_python_command_is_one_a_user_can_type(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """Printed in the start-up hints: the venv's python, relative when that is shorter, and
    absolute when relative would climb out of the working directory (the image's /opt/venv)."""
    import sys

    from config.paths import python_command

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    assert python_command() == ".venv/bin/python"
    monkeypatch.setattr(sys, "executable", "/opt/venv/bin/python")
    assert python_command() == "/opt/venv/bin/python"


def test_a_catalog_takes_the_top_level_settings_as_its_defaults(tmp_path: Path) -> None:
    model = bundled_model()
    assert model is not None
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(model.read_bytes()[:64])
    cfg = write(tmp_path / "c.toml", f"""parallel = 3
cache_ram = 128
ttl = 30
max_loaded = 2

[models.coder]
gguf = "models/m.gguf"
aliases = ["gpt-4o"]
ctx_size = 4096
ttl = 0

[models.remote]
url = "https://gpu.example/v1/"
api_key = "sk-secret-remote"

[models.only-gguf]
gguf = "{model}"
""")
    s = load_settings({"config": str(cfg)}, env={})
    coder, remote, only = s.models  # tables alone: the bundled model is not added
    assert not s.supervise and s.max_loaded == 2
    assert coder.gguf == tmp_path / "models" / "m.gguf"  # relative to the config file
    assert (coder.parallel, coder.cache_ram, coder.ttl, coder.ctx_size) == (3, 128, 0, 4096)
    assert coder.aliases == ("gpt-4o",) and not coder.preload
    assert remote.urls == ("https://gpu.example",) and remote.parallel is None
    assert (only.parallel, only.cache_ram, only.ttl, only.llama_args) == (3, 128, 30, ())
    # --model beside the tables: that model first, the default, started with the appliance
    both = load_settings({"config": str(cfg), "model": str(model)}, env={})
    assert [m.id for m in both.models] == ["SmolLM2-135M-Instruct.Q4_1", "coder", "remote",
                                           "only-gguf"]
    assert both.models[0].preload


@pytest.mark.parametrize(("table", "setting"), [
    ('[models.x]\nllama_args = ["-c", "8"]', "models.x"),  # neither gguf nor url
    ('[models.x]\ngguf = "/no/such.gguf"', "models.x.gguf"),
    ('[models.x]\nurl = "ftp://host/"', "models.x.url"),
    ('[models.x]\nurl = "http://h"\ngguf = "/m.gguf"', "models.x"),
    ('[models.x]\ngguf = "/m.gguf"\napi_key = "k"', "models.x.api_key"),
    ('[models.x]\nurl = "http://h"\nttl = -1', "models.x.ttl"),
    ('[models.x]\nurl = "http://h"\nparallel = "2"', "models.x.parallel"),
    ('[models.x]\nurl = "http://h"\nflavour = 1', "models.x.flavour"),
    ('[models.x]\nurl = "http://h"\n[models.y]\nurl = "http://h"\naliases = ["x"]', "models.y"),
    ('[models."bad id!"]\nurl = "http://h"', "models.bad id!"),
    ('models = 3', "models"),
])
def test_a_bad_catalog_entry_is_named(tmp_path: Path, table: str, setting: str) -> None:
    cfg = write(tmp_path / "c.toml", table + "\n")
    with pytest.raises(ConfigError) as err:
        load_settings({"config": str(cfg)}, env={})
    assert err.value.setting == setting, str(err.value)


def test_the_catalog_is_set_in_the_config_file_only() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({}, env={"LLAMA_PROXY_MODELS": "x"})
    assert "config file only" in str(err.value)
