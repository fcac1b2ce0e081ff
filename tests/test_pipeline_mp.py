"""Input pipeline with grain's multiprocess prefetch, run the way a binary runs it (app.run).

The worker processes are spawned, so the pipeline runs in a subprocess whose script has a __main__
guard and parses absl flags first, as sora_jax.train does.
"""

import pathlib
import subprocess
import sys
import textwrap

import pytest
import test_pipeline

_SCRIPT = textwrap.dedent('''
    """Compares worker_count=2 against in-process reading, and restores across worker counts."""
    import json
    import sys

    import numpy as np
    from absl import app, flags

    sys.path.insert(0, {tests_dir!r})
    import test_pipeline
    from sora_jax.data import pipeline

    _DATA = flags.DEFINE_string("data_dir", None, "prepared dataset dir")
    _PACKING = flags.DEFINE_bool("packing", False, "pack clips")


    def batches(config, num, state=None):
      iterator = pipeline.make_iterator(config, _DATA.value, "train", process_index=0,
                                        process_count=1, seed=0, batch_size_per_process=2)
      if state is not None:
        iterator.set_state(state)
      out = [next(iterator) for _ in range(num)]
      state = json.loads(json.dumps(iterator.get_state()))
      if hasattr(iterator, "close"):
        iterator.close()
      return out, state


    def same(a, b):
      return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


    def main(argv):
      del argv
      config = test_pipeline._config(image_ratio=0.25, record_dtype="bfloat16",
                                     packing=_PACKING.value, token_budget=64)
      reference, _ = batches(config, 10)
      config.data.worker_count = 2
      parallel, _ = batches(config, 10)
      assert same(reference, parallel), "worker_count=2 changed the batches"
      head, state = batches(config, 4)
      tail, _ = batches(config, 6, state)
      assert same(head + tail, parallel), "restore under worker processes is not exact"
      config.data.worker_count = 0
      tail, _ = batches(config, 6, state)
      assert same(head + tail, parallel), "restore with another worker_count is not exact"
      print("MP_OK")


    if __name__ == "__main__":
      app.run(main)
    ''')


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_multiprocess_prefetch_matches_in_process(tmp_path, packing):
  test_pipeline._write_dataset(str(tmp_path / "data"))
  tests_dir = pathlib.Path(__file__).resolve().parent
  script = tmp_path / "mp_pipeline.py"
  script.write_text(_SCRIPT.format(tests_dir=str(tests_dir)))
  result = subprocess.run(
      [sys.executable, str(script), f"--data_dir={tmp_path / 'data'}", f"--packing={packing}"],
      capture_output=True, text=True, timeout=300, cwd=tests_dir.parent)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "MP_OK" in result.stdout
