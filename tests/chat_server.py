"""A minimal OpenAI-compatible chat-completions server of a local model, for tests (127.0.0.1 only).

  python tests/chat_server.py MODEL_DIR LIFETIME_S text|vision

Serves GET /v1/models and POST /v1/chat/completions (temperature and seed accepted; replies are
greedy; image_url parts as PNG data URLs) with sora_jax.language.chat's local models, prints
"listening on PORT" and exits by itself after LIFETIME_S seconds.
"""

import base64
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sora_jax.language import chat

MODEL_NAME = "tiny-lm"


def _decode_images(message: dict) -> dict:
  """OpenAI image_url parts (PNG data URLs) -> sora_jax's {"type": "image", "image": array} parts."""
  import numpy as np
  from PIL import Image

  if isinstance(message["content"], str):
    return message
  parts = []
  for part in message["content"]:
    if part["type"] == "image_url":
      data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
      parts.append({"type": "image", "image": np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))})
    else:
      parts.append(part)
  return {"role": message["role"], "content": parts}


def main() -> None:
  directory, lifetime_s, kind = sys.argv[1], float(sys.argv[2]), sys.argv[3]
  model = chat.LocalVisionChatModel(directory) if kind == "vision" else chat.LocalChatModel(directory)
  lock = threading.Lock()

  class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, body: dict) -> None:
      data = json.dumps(body).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's name
      if self.path == "/v1/models":
        self._send(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})
      else:
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):  # noqa: N802
      if self.path != "/v1/chat/completions":
        self._send(404, {"error": {"message": f"no route {self.path}"}})
        return
      request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      if request.get("model") != MODEL_NAME:
        self._send(404, {"error": {"message": f"model {request.get('model')!r} is not served"}})
        return
      with lock:
        messages = [_decode_images(m) for m in request["messages"]]
        reply = model.complete(messages, seed=int(request.get("seed", 0)),
                               max_new_tokens=int(request.get("max_tokens", 160)))
      self._send(200, {"object": "chat.completion", "model": MODEL_NAME, "choices": [
          {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]})

    def log_message(self, *args):
      pass

  server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Timer(lifetime_s, server.shutdown).start()
  print(f"listening on {server.server_address[1]}", flush=True)
  server.serve_forever()


if __name__ == "__main__":
  main()
