"""A TFDS dataset ready to read, or an error within seconds that says how to get it there.

Offline, TFDS's own `download_and_prepare` retries each download with exponential back-off for
minutes before it says anything. `prepared_builder` therefore does, in order:

  1. the dataset is prepared under `data_dir` (or readable, as under `tfds.testing.mock_data`):
     return its builder;
  2. it needs files only a person can fetch (ImageNet): raise `DatasetUnavailableError` saying
     where they go and how to prepare them (hours; never started implicitly);
  3. every download URL answers one HEAD request within `PROBE_TIMEOUT_S` (through the proxies
     in the environment, as TFDS's downloads would): let TFDS download and prepare it;
  4. otherwise raise `DatasetUnavailableError` naming the dataset, the directory searched, the
     URLs that did not answer, and how to prepare it on another machine and point
     `--config.dataset.data_dir` at it (a local copy or a bucket).

Only the dataset's own URLs (TFDS's checksums list) are probed, not TFDS's mirror on Google
Cloud Storage, so a machine that reaches the bucket but not the source is refused too; prepare
the data elsewhere for it. A dataset whose URLs TFDS does not list is handed to TFDS unprobed.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import tensorflow_datasets as tfds

PROBE_TIMEOUT_S = 5.0  # Whole probe (all URLs at once); TFDS's retries would take minutes.
_REASON_CHARS = 160  # Enough of a network error to recognise it.


class DatasetUnavailableError(FileNotFoundError):
  """A TFDS dataset is not prepared and cannot be prepared here; the message says what to do."""


def prepared_builder(
  name: str, data_dir: str | None, *, probe_timeout_s: float = PROBE_TIMEOUT_S
) -> tfds.core.DatasetBuilder:
  """The builder of a TFDS dataset that is prepared under `data_dir`, preparing it if it can.

  Args:
    name: TFDS name, e.g. "cifar10" or "lm1b".
    data_dir: TFDS data directory (local or gs://); None is TFDS's default,
      `~/tensorflow_datasets`.
    probe_timeout_s: how long the download URLs get to answer, all together.

  Returns:
    The builder; `as_dataset` works on it.

  Raises:
    DatasetUnavailableError: not prepared, and it needs a manual download or its download URLs
      did not answer; raised within about `probe_timeout_s` seconds.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if _readable(builder):
    return builder
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    raise DatasetUnavailableError(_manual_message(builder))
  silent = unreachable(list(builder.url_infos or ()), probe_timeout_s)
  if silent:
    raise DatasetUnavailableError(_offline_message(builder, silent, probe_timeout_s))
  builder.download_and_prepare()
  return builder


def unreachable(urls: list[str], timeout_s: float) -> dict[str, str]:
  """Sends one HEAD request to every URL at once; returns {url: reason} for those unanswered.

  Any HTTP response, an error status included, counts as an answer: the host is reachable and
  TFDS's own download will report what is wrong. Name resolution is bounded too (a blocked
  probe is abandoned at the deadline in its daemon thread).

  Args:
    urls: URLs to probe.
    timeout_s: deadline for all of them together.

  Returns:
    The URLs that gave no HTTP response before the deadline, each with the reason.
  """
  answers: dict[str, str | None] = {}  # url -> None (answered) or the error; one writer per url.
  # A fresh opener reads the proxy variables now (`urlopen` caches the first ones it saw).
  opener = urllib.request.build_opener()

  def probe(url: str) -> None:
    try:
      opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
      pass  # The server answered (e.g. 403, 405): the host is reachable.
    except Exception as e:  # Any other failure means the download would not start either.
      answers[url] = f"{type(e).__name__}: {e}"[:_REASON_CHARS]
      return
    answers[url] = None

  threads = [threading.Thread(target=probe, args=(url,), daemon=True) for url in urls]
  for thread in threads:
    thread.start()
  deadline = time.monotonic() + timeout_s
  for thread in threads:
    thread.join(max(0.0, deadline - time.monotonic()))
  silent = {}
  for url in urls:
    reason = answers.get(url, f"no answer within {timeout_s:g} s")
    if reason is not None:
      silent[url] = reason
  return silent


def _readable(builder: tfds.core.DatasetBuilder) -> bool:
  if builder.is_prepared():
    return True
  # `is_prepared` looks for dataset_info.json; opening the splits is the final word, and the
  # only check that passes under `tfds.testing.mock_data`, where nothing is on disk.
  try:
    builder.as_dataset()
  except AssertionError:  # What tfds 4.9 raises for "could not find data in <data_dir>".
    return False
  return True


def _where_to_point(name: str, root) -> str:
  return (
    f"Then point the run at it: copy DIR/{name} to {root / name} and pass "
    f"--config.dataset.data_dir={root}, or copy it to a bucket "
    f"(gsutil -m cp -r DIR/{name} gs://BUCKET/tensorflow_datasets/) and pass "
    f"--config.dataset.data_dir=gs://BUCKET/tensorflow_datasets."
  )


def _offline_message(builder: tfds.core.DatasetBuilder, silent: dict[str, str], timeout_s) -> str:
  name, root = builder.name, builder.data_dir_root
  urls = "\n".join(f"  {url} ({reason})" for url, reason in silent.items())
  return (
    f"TFDS dataset {name!r} is not prepared in {root} (looked for {builder.data_dir}), and it "
    f"cannot be downloaded from this machine: within {timeout_s:g} s, no answer from\n{urls}\n"
    f"Prepare it on a machine with internet access, into any directory DIR, with this repo's "
    f"environment:\n"
    f'  python -c "import tensorflow_datasets as tfds; '
    f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"\n"
    + _where_to_point(name, root)
  )


def _manual_message(builder: tfds.core.DatasetBuilder) -> str:
  name, root = builder.name, builder.data_dir_root
  manual = root / "downloads" / "manual"
  return (
    f"TFDS dataset {name!r} is not prepared in {root} (looked for {builder.data_dir}). It needs "
    f"a manual download; TFDS's instructions:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.rstrip()}\n"
    f"Put those files in {manual}/ and prepare it once (hours) with\n"
    f'  python -c "import tensorflow_datasets as tfds; '
    f"tfds.builder('{name}', data_dir='{root}').download_and_prepare()\"\n"
    f"(not the `tfds build` command: it needs apache-beam, which conflicts with this repo's "
    f"pinned pillow). Or prepare it the same way on another machine, with DIR for {root} "
    f"there. " + _where_to_point(name, root)
  )
