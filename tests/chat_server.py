"""A minimal OpenAI-compatible chat-completions server of a local model, for tests (127.0.0.1 only).

  python tests/chat_server.py MODEL_DIR LIFETIME_S

Serves GET /v1/models and POST /v1/chat/completions (temperature and seed accepted; replies are
greedy) with sora_jax.language.chat.LocalChatModel, prints "listening on PORT" and exits by itself
after LIFETIME_S seconds.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sora_jax.language import chat

MODEL_NAME = "tiny-lm"


def main() -> None:
  directory, lifetime_s = sys.argv[1], float(sys.argv[2])
  model = chat.LocalChatModel(directory)
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
        reply = model.complete(request["messages"], seed=int(request.get("seed", 0)),
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
