"""Choosing the image backend from data.loader, and the choice being logged."""

from __future__ import annotations

import logging

import pytest

from megatron_ibxl.data import backends
from megatron_ibxl.errors import UserError


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(backends, "_logged_choice", set())


def test_auto_picks_dali_when_it_imports(fresh_log, caplog):
    with caplog.at_level(logging.INFO):
        assert backends.select_loader("auto") == "dali"
    assert "data loader: DALI" in caplog.text


def test_auto_falls_back_and_says_why(fresh_log, monkeypatch, caplog):
    monkeypatch.setattr(backends, "_dali_version", lambda: None)
    with caplog.at_level(logging.INFO):
        assert backends.select_loader("auto") == "torch"
    assert "fallback" in caplog.text and "does not import" in caplog.text


def test_torch_when_asked(fresh_log):
    assert backends.select_loader("torch") == "torch"


def test_dali_asked_but_missing_is_a_user_error(monkeypatch):
    monkeypatch.setattr(backends, "_dali_version", lambda: None)
    with pytest.raises(UserError, match="data.loader=dali"):
        backends.select_loader("dali")
