"""The `hub_server` pytest fixture: a loopback Hub (tests/hub_server.py) that huggingface_hub talks to.

Use it with `from hub_fixtures import hub_server` in a test module, or `pytest_plugins = ["hub_fixtures"]`
in a conftest.py. For the duration of a test the fixture
- starts a fresh, empty `HubServer` on 127.0.0.1 (so no test depends on another's repos),
- points huggingface_hub at it: HF_ENDPOINT, HF_TOKEN=`HUB_TOKEN`, HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=0,
  and an empty HF_HOME (hence Hub cache, token file, ...) under tmp_path,
- patches the copies of those settings that huggingface_hub and diffusers made at import time,
and restores everything afterwards (monkeypatch). Tests that need "no token" do
`monkeypatch.delenv("HF_TOKEN")`: the isolated HF_HOME holds no stored token either.
"""

import os
import sys

import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_api
from huggingface_hub.utils import _http

from hub_server import HubServer

HUB_TOKEN = "hf_test_token"

# Environment variables that would send requests elsewhere or pick up another identity.
_UNSET_ENV = ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
              "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "HF_HUB_DISABLE_IMPLICIT_TOKEN")


def _point_hub_at(monkeypatch, endpoint: str, home: str) -> None:
    """Sets the environment and the import-time constants so that huggingface_hub and diffusers use `endpoint`."""
    for name in _UNSET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    old_endpoint, old_home = hf_constants.ENDPOINT, hf_constants.HF_HOME
    new_values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HUGGINGFACE_CO_URL_HOME": endpoint + "/",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        # diffusers.utils.constants: its endpoint (error messages) and dynamic-modules cache.
        "HUGGINGFACE_CO_RESOLVE_ENDPOINT": endpoint,
        "HF_MODULES_CACHE": os.path.join(home, "modules"),
    }
    # Every path derived from HF_HOME at import time (HF_HUB_CACHE, HF_TOKEN_PATH, HF_XET_CACHE, ...).
    for name in dir(hf_constants):
        value = getattr(hf_constants, name)
        if name.isupper() and isinstance(value, str) and (value == old_home or value.startswith(old_home + os.sep)):
            new_values[name] = home + value[len(old_home):]

    # huggingface_hub.constants itself, and the copies that `from ... import NAME` made in other modules
    # (diffusers.utils.hub_utils.HF_HUB_OFFLINE, huggingface_hub.utils._cache_manager.HF_HUB_CACHE, ...):
    # a module attribute with one of these names that still holds the original value is such a copy.
    originals = {name: getattr(hf_constants, name, None) for name in new_values}
    originals["HUGGINGFACE_CO_RESOLVE_ENDPOINT"] = old_endpoint
    originals["HF_MODULES_CACHE"] = os.getenv("HF_MODULES_CACHE", os.path.join(old_home, "modules"))
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("huggingface_hub", "diffusers")):
            continue
        for name, value in new_values.items():
            if hasattr(module, name) and getattr(module, name) == originals[name]:
                monkeypatch.setattr(module, name, value)

    # The module-level HfApi behind huggingface_hub.create_repo/upload_folder/... read ENDPOINT when imported.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A fresh in-memory Hub on 127.0.0.1 that huggingface_hub (and so hfgen and diffusers) talks to."""
    server = HubServer(token=HUB_TOKEN).start()
    _point_hub_at(monkeypatch, server.url, str(tmp_path / "hf_home"))
    _http.close_session()  # no pooled connection (or proxy setting) from before
    try:
        yield server
    finally:
        _http.close_session()
        server.stop()
        # monkeypatch (torn down after this) restores the environment and the constants.
