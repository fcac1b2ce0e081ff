"""FVD and CLIP score pieces: the Fréchet distance against scipy's formula, and the feature models on
random weights against the reference libraries they wrap."""

import os

import numpy as np
import pytest
import scipy.linalg
from feature_model_helpers import make_siglip, make_videomae

from sora_jax.evaluation import feature_models, frechet

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _scipy_frechet(a, b):
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))


@pytest.mark.parametrize("count,width", [(200, 8), (40, 16)])
def test_frechet_distance_equals_scipy_sqrtm(count, width):
  rng = np.random.default_rng(0)
  real = rng.normal(size=(count, width)) @ rng.normal(size=(width, width))
  fake = rng.normal(0.3, 1.5, size=(count, width)) @ rng.normal(size=(width, width))
  ours = frechet.distance(frechet.statistics(real), frechet.statistics(fake))
  np.testing.assert_allclose(ours, _scipy_frechet(real, fake), rtol=1e-6)


def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_noise():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(24, 32))  # fewer clips than features: a singular covariance
  stats = frechet.statistics(real)
  assert frechet.distance(stats, stats) < 1e-8
  distances = [frechet.distance(stats, frechet.statistics(real + rng.normal(0, s, real.shape)))
               for s in (0.1, 0.5, 2.0)]
  assert distances == sorted(distances) and distances[0] > 0
  with pytest.raises(ValueError, match=r"expected \[N, D\] with N >= 2"):
    frechet.statistics(real[:1])


def _videos(count, frames=6, height=36, width=44, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8) for _ in range(count)]


def test_spread_frames_covers_the_clip():
  video = np.arange(10)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  assert list(feature_models.spread_frames(video, 4)[:, 0, 0, 0]) == [0, 3, 6, 9]
  assert list(feature_models.spread_frames(video[:2], 4)[:, 0, 0, 0]) == [0, 0, 1, 1]


@pytest.fixture(scope="module")
def videomae_dir(tmp_path_factory):
  return make_videomae(str(tmp_path_factory.mktemp("videomae")))


def test_videomae_features_equal_transformers(videomae_dir):
  model = feature_models.open_video_model(videomae_dir)
  assert model.name == "videomae:" + os.path.basename(videomae_dir) and model.num_frames == 4
  videos = _videos(3)
  ours = model.features(videos)
  reference_model = transformers.VideoMAEModel.from_pretrained(videomae_dir).eval()
  processor = transformers.VideoMAEImageProcessor.from_pretrained(videomae_dir)
  for video, row in zip(videos, ours, strict=True):
    frames = list(video[[0, 2, 3, 5]])  # 4 of 6 frames, spread evenly
    with torch.no_grad():
      pixels = processor(frames, return_tensors="pt")["pixel_values"]
      expected = reference_model(pixel_values=pixels).last_hidden_state.mean(1)[0].numpy()
    np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-6)


class _TinyI3D(torch.nn.Module):
  """The published I3D TorchScript's call signature around a small 3D convolution."""

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv3d(3, 5, kernel_size=(3, 7, 7), stride=(2, 4, 4))

  def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
              return_features: bool = False) -> torch.Tensor:
    if rescale or resize:
      raise RuntimeError("FVD feeds prepared clips")
    features = self.conv(x).mean(dim=(2, 3, 4))
    return features if return_features else features.softmax(-1)


def test_i3d_torchscript_gets_clips_as_the_published_fvd_code_prepares_them(tmp_path):
  torch.manual_seed(0)
  path = str(tmp_path / "i3d_torchscript.pt")
  torch.jit.script(_TinyI3D().eval()).save(path)
  model = feature_models.open_video_model(path)
  assert model.name == "i3d:i3d_torchscript.pt" and model.num_frames == 16
  videos = _videos(2, frames=20, height=40, width=60)
  ours = model.features(videos)
  detector = torch.jit.load(path).eval()
  for video, row in zip(videos, ours, strict=True):
    frames = feature_models.spread_frames(video, 16)
    clip = torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 127.5 - 1  # [F, 3, H, W]
    clip = torch.nn.functional.interpolate(clip, size=(224, 336), mode="bilinear", align_corners=False)
    clip = clip[:, :, :, 56:280].permute(1, 0, 2, 3)[None]  # centre crop, [1, 3, F, 224, 224]
    with torch.no_grad():
      expected = detector(clip, rescale=False, resize=False, return_features=True)[0].numpy()
    np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-6)


def test_feature_model_errors_name_the_field(tmp_path):
  with pytest.raises(feature_models.FeatureModelError, match=r"eval.fvd_model='/nope' does not exist"):
    feature_models.open_video_model("/nope")
  (tmp_path / "junk.pt").write_bytes(b"not a model")
  with pytest.raises(feature_models.FeatureModelError, match="is not a TorchScript file"):
    feature_models.open_video_model(str(tmp_path / "junk.pt"))
  with pytest.raises(feature_models.FeatureModelError, match="has no config.json"):
    feature_models.open_video_model(str(tmp_path))
  with pytest.raises(feature_models.FeatureModelError, match="eval.clip_model='' is not a directory"):
    feature_models.open_image_text_model("")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  return make_siglip(str(tmp_path_factory.mktemp("siglip")))


def test_clip_score_equals_the_reference_model(siglip_dir):
  model = feature_models.open_image_text_model(siglip_dir)
  assert model.name.startswith("siglip:")
  videos, prompts = _videos(2, frames=5), ["a red ball rolls", "a boat on a lake"]
  scores = feature_models.clip_scores(model, videos, prompts, frames=3)
  reference = transformers.SiglipModel.from_pretrained(siglip_dir).eval()
  processor = transformers.SiglipProcessor.from_pretrained(siglip_dir)
  for video, prompt, score in zip(videos, prompts, scores, strict=True):
    with torch.no_grad():
      text = processor(text=[prompt], padding="max_length", return_tensors="pt")
      text_embeds = reference(**text, pixel_values=torch.zeros(1, 3, 32, 32)).text_embeds[0].double()
      images = processor(images=list(video[[0, 2, 4]]), return_tensors="pt")["pixel_values"]
      image_embeds = reference.get_image_features(pixel_values=images).pooler_output.double()
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm()
    expected = 100 * float((image_embeds @ text_embeds).mean())
    consistency = 100 * float((image_embeds[1:] * image_embeds[:-1]).sum(-1).mean())
    np.testing.assert_allclose(score["clip_score"], expected, rtol=1e-5, atol=1e-4)  # 0-100 scale, fp32
    np.testing.assert_allclose(score["clip_consistency"], consistency, rtol=1e-5, atol=1e-4)
  still = [np.repeat(videos[0][:1], 5, axis=0)]
  assert feature_models.clip_scores(model, still, prompts[:1], frames=3)[0]["clip_consistency"] == \
      pytest.approx(100.0)
