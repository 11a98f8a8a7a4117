"""An unprepared TFDS dataset that cannot be downloaded fails within seconds, saying how to fix it.

Every test here is offline by construction: the proxies in the environment point at a closed
local port, so neither the probe nor TFDS could reach the internet even where it exists.
"""

import http.server
import socket
import threading
import time

import pytest

from ilbp.data import images, prepare, text


@pytest.fixture
def offline(monkeypatch):
  with socket.socket() as s:  # A port nobody listens on: connections are refused at once.
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
  for var in ("NO_PROXY", "no_proxy"):
    monkeypatch.delenv(var, raising=False)
  for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    monkeypatch.setenv(var, dead)


def _assert_says_how_to_prepare(message, name, data_dir):
  assert f"TFDS dataset {name!r} is not prepared in {data_dir}" in message
  assert "cannot be downloaded from this machine" in message
  assert f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()" in message
  assert f"--config.dataset.data_dir={data_dir}" in message
  assert "--config.dataset.data_dir=gs://BUCKET/tensorflow_datasets" in message


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_unreachable_cifar_fails_fast_saying_how(tmp_path, name):
  start = time.monotonic()
  with pytest.raises(prepare.DatasetUnavailableError) as error:
    images.get_data(name, batch_size=4, seed=0, data_dir=str(tmp_path))
  assert time.monotonic() - start < 30
  _assert_says_how_to_prepare(str(error.value), name, tmp_path)
  assert "https://www.cs.toronto.edu/~kriz/" in str(error.value)  # The URL that did not answer.
  assert not list(tmp_path.iterdir())  # Nothing half-downloaded left behind.


@pytest.mark.usefixtures("offline")
def test_unreachable_lm1b_fails_fast_saying_how(tmp_path):
  start = time.monotonic()
  with pytest.raises(prepare.DatasetUnavailableError) as error:
    text.get_data("lm1b", batch_size=4, seq_len=8, seed=0, data_dir=str(tmp_path))
  assert time.monotonic() - start < 30
  _assert_says_how_to_prepare(str(error.value), "lm1b", tmp_path)
  assert "http://www.statmt.org/" in str(error.value)


def test_probe_bounds_a_host_that_never_answers_and_accepts_any_http_answer(monkeypatch):
  for var in ("HTTP_PROXY", "http_proxy"):  # Talk to the local servers directly.
    monkeypatch.delenv(var, raising=False)
  with socket.socket() as silent:  # Accepts connections (the backlog) but never replies.
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/data.tar.gz"
    start = time.monotonic()
    assert set(prepare.unreachable([url], timeout_s=1.0)) == {url}
    assert time.monotonic() - start < 3

  # A server that refuses HEAD (501) still answered: the download may go ahead.
  server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    answered = f"http://127.0.0.1:{server.server_address[1]}/data.tar.gz"
    assert prepare.unreachable([answered], timeout_s=5.0) == {}
  finally:
    server.shutdown()
    server.server_close()
