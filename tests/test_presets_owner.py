"""Saved presets behind a login belong to the user who saved them (issue 24, security 7); without a login, one
shared folder as before. The HTTP test with two users is test_security.py's
test_saved_presets_belong_to_the_user_who_saved_them."""

from __future__ import annotations

import pytest

from qlora_ui import presets as pr
from qlora_ui.config import ConfigError, RunConfig


@pytest.fixture()
def store(tmp_path):
    (tmp_path / "bundled.yaml").write_text(pr.to_yaml(RunConfig().updated(max_steps=5)))
    return tmp_path


def test_each_user_lists_loads_and_replaces_only_their_own(store):
    pr.save_preset(RunConfig().updated(max_steps=11), "mine", store, owner="alice")
    pr.save_preset(RunConfig().updated(max_steps=22), "mine", store, owner="bob")
    pr.save_preset(RunConfig().updated(max_steps=33), "bobs", store, owner="bob")
    assert pr.list_presets(store, "alice") == ["bundled", "mine"]
    assert pr.list_presets(store, "bob") == ["bobs", "bundled", "mine"]
    assert pr.load_preset("mine", store, "alice").training.max_steps == 11
    assert pr.load_preset("mine", store, "bob").training.max_steps == 22
    with pytest.raises(ConfigError, match="'bobs' not found"):
        pr.load_preset("bobs", store, "alice")
    assert pr.load_preset("bundled", store, "alice").training.max_steps == 5  # bundled: shared
    with pytest.raises(ConfigError, match="bundled preset"):
        pr.save_preset(RunConfig(), "bundled", store, owner="alice")
    # Without a login: the one shared folder, where none of the users' presets are.
    assert pr.list_presets(store) == ["bundled"]
    pr.save_preset(RunConfig(), "shared", store)
    assert (store / "user" / "shared.yaml").is_file() and "shared" not in pr.list_presets(store, "alice")


@pytest.mark.parametrize("user", ["../../etc", "a/b", "..", "Ünïcode user", "x" * 300])
def test_any_user_name_gets_a_folder_of_its_own_inside_the_user_presets(store, user):
    d = pr.user_presets_dir(store, user)
    assert d.parent == store / "user" / "by-user" and d.name not in ("", ".", "..") and len(d.name) <= 64
    assert d != pr.user_presets_dir(store, user + "!")  # names differing only in dropped characters stay apart
    pr.save_preset(RunConfig(), "p", store, owner=user)
    assert pr.list_presets(store, user) == ["bundled", "p"]
