"""Look-back through the server: documents keep their token ids, ``lookback`` per request, capped."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
from serve_helpers import MODEL, TEXT, http, save_chat_model, serve_in_process, tiny_server_config, upload

from nugget2d.runtime.lookback import IDS_FILE
from nugget2d.runtime.session import StreamingSession
from nugget2d.serve import cli
from nugget2d.serve.app import load_model
from nugget2d.serve.config import ServerConfig

ASK = {"model": MODEL, "messages": [{"role": "user", "content": "who had the book ?"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("lookback-model"))


@pytest.fixture(scope="module")
def loaded(model_dir) -> tuple:
    return load_model(_config(model_dir, Path("unused")))


def _config(model_dir: Path, documents: Path, **overrides) -> ServerConfig:
    # every request reads its document from disk (document_memory_bytes=1)
    return tiny_server_config(model_dir, documents, 512, 128, 64, document_memory_bytes=1, **overrides)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_documents_keep_their_ids_and_requests_look_back_within_the_cap(model_dir, loaded, tmp_path):
    documents = tmp_path / "documents"
    with serve_in_process(_config(model_dir, documents, max_lookback=128), loaded) as url:
        doc = upload(url, TEXT * 20, headers={}).json()["id"]
        session = StreamingSession.load(documents / doc, *loaded)
        assert session.token_ids is not None and len(session.token_ids) == int(session.cache.seen_tokens[0])
        body = {**ASK, "documents": [doc], "temperature": 0}
        plain = http.post(url + "/v1/chat/completions", json=body)
        looked = http.post(url + "/v1/chat/completions", json={**body, "lookback": 128})
        assert plain.status_code == looked.status_code == 200
        assert http.post(url + "/v1/chat/completions", json=body).json()["choices"] == plain.json()["choices"]
        long_prompt = {"model": MODEL, "prompt": TEXT * 12 + "who had", "max_tokens": 2, "lookback": 64}
        assert http.post(url + "/v1/completions", json=long_prompt).status_code == 200  # a compressed prompt

        too_much = _error(http.post(url + "/v1/chat/completions", json={**body, "lookback": 129}), 400)
        assert too_much["param"] == "lookback" and "--max-lookback" in too_much["message"]
        negative = http.post(url + "/v1/chat/completions", json={**body, "lookback": -1})
        assert negative.status_code == 422 and "lookback" in negative.text

        (documents / doc / IDS_FILE).unlink()  # as documents were stored before they kept their ids
        old = _error(http.post(url + "/v1/chat/completions", json={**body, "lookback": 64}), 400)
        assert "upload it again" in old["message"] and old["param"] == "lookback"
        assert http.post(url + "/v1/chat/completions", json=body).status_code == 200  # without look-back: fine


def test_the_default_lookback_cannot_pass_the_cap(model_dir):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(ValueError, match="exceeds --max-lookback"):
        cli.config_from(parser.parse_args(["--lookback", "256", "--max-lookback", "128"]))
    with pytest.raises(ValueError, match="max-lookback must be >= 0"):
        cli.config_from(parser.parse_args(["--max-lookback", "-1"]))
    assert cli.config_from(parser.parse_args(["--lookback", "64"])).stream.lookback == 64
    with pytest.raises(SystemExit):
        parser.parse_args(["--lookback-placement", "middle"])


def test_documents_are_asked_with_the_servers_lookback_placement(model_dir, loaded, tmp_path, asked_lookbacks):
    """A stored document keeps the settings it was read with; its questions look back where this server's
    ``--lookback-placement`` says."""
    documents = tmp_path / "documents"
    config = _config(model_dir, documents, max_lookback=128)
    config.stream = dataclasses.replace(config.stream, lookback_placement="alone")
    with serve_in_process(config, loaded) as url:
        doc = upload(url, TEXT * 20, headers={}).json()["id"]
        assert StreamingSession.load(documents / doc, *loaded).settings.lookback_placement == "alone"
        saved = documents / doc / "session.json"
        state = json.loads(saved.read_text())
        state["settings"]["lookback_placement"] = "after"  # as if uploaded to a server placing spans after the cache
        saved.write_text(json.dumps(state))
        body = {**ASK, "documents": [doc], "temperature": 0, "lookback": 64}
        assert http.post(url + "/v1/chat/completions", json=body).status_code == 200
    assert [(look.tokens, look.placement) for look in asked_lookbacks] == [(64, "alone")]
