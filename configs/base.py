"""Every sora_jax config field, declared once, grouped by subsystem.

Config files (`configs/tiny.py`, `configs/wan_1_3b.py`, ...) start from `get_config()` here and set
only what differs; `sora_jax.config.validate` checks the cross-field rules when a binary loads one.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config: the Wan2.1 1.3B model shape with a small CPU-friendly run."""
  config = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- model (Wan2.1 DiT)
  model = config.model = ml_collections.ConfigDict()
  model.dim = 1536  # transformer width D
  model.num_heads = 12  # attention heads; head_dim = dim // num_heads
  model.ffn_dim = 8960  # hidden width of the GELU-tanh feed-forward
  model.num_layers = 30  # number of transformer blocks
  model.in_channels = 16  # latent channels C of the input
  model.out_channels = 16  # latent channels of the predicted velocity
  model.patch_size = (1, 2, 2)  # (p_t, p_h, p_w) of the Conv3d patch embedding
  model.text_dim = 4096  # width D_text of the text encoder's embeddings
  model.freq_dim = 256  # sinusoidal timestep embedding width
  model.eps = 1e-6  # epsilon of every LayerNorm / RMSNorm
  model.rope_theta = 10000.0  # base of the 3D rotary position embedding
  model.rope_max_seq_len = 1024  # largest patch-grid extent per axis the RoPE table covers
  model.cross_attn_norm = True  # affine LayerNorm (norm2) before cross-attention
  model.qk_norm = True  # RMSNorm on q and k across all heads
  # Adds a fixed sin-cos embedding of each token's (t, h, w) patch-grid position to the patch embeddings
  # (absolute position, as DiT and Open-Sora's STDiT). Wan2.1 has only RoPE: such a model cannot be
  # exported to diffusers or Wan.
  model.abs_pos_embedding = False
  # What the network's last layer predicts: "velocity" (Wan2.1: noise - x0) or "x0" (the clean latents;
  # the DiT returns the velocity (x_t - x0) / sigma, so training, sampling and eval are unchanged). x0
  # suits pixel-space latents with many values per token: the network need not carry the noise through.
  model.prediction = "velocity"
  model.param_dtype = "float32"  # dtype parameters are stored in
  model.compute_dtype = "bfloat16"  # dtype of matmuls and attention; norms/modulation stay fp32
  # dtype of the residual stream between blocks: float32 (Wan's amp autocast) | bfloat16 (diffusers' bf16
  # pipeline: each block adds in fp32, stores bf16). bf16 halves what remat keeps per layer.
  model.residual_dtype = "float32"
  # auto (splash on TPU, cudnn on NVIDIA GPUs, ring when the sequence is split over `context`, else xla,
  # or xla_chunked past 4096 keys) | xla | xla_chunked | cudnn | splash | ring | all_to_all
  model.attention_backend = "auto"
  # Tile-sparse self-attention (docs/scaling.md, "Sparse attention"): each query tile of
  # sparse_attention_tile (t, h, w) patch tokens attends keep x (all tiles) key tiles: the nearest ones
  # ("window"; splash skips the rest on TPU), the highest-scoring ones by pooled q.k ("topk"), or half
  # of each ("window_topk"); the last two are chosen per input: on TPU they run on tile_splash (tiles of
  # whole 128-token lanes; others on tile_attention), elsewhere on tile_attention.
  # 1.0 = dense. Not with packing or context parallelism.
  model.sparse_attention_keep = 1.0
  model.sparse_attention_tile = (2, 8, 8)
  model.sparse_attention_rule = "window"
  # none | full | dots_saveable | offload (full, with each block's input kept in host memory) | offload_dots
  model.remat_policy = "none"
  model.scan_layers = True  # run blocks under nn.scan with stacked ('layers') parameters
  # Layers per iteration of that loop (0 = all: no loop, the same stacked parameters and init). Unrolled,
  # XLA drops the stacking of each layer's saved activations; compile time grows with depth.
  model.scan_unroll = 1
  # Denoising experts (Wan2.2 A14B): 1 = one DiT for every noise level; 2 = two DiTs of this shape, "high"
  # for sigma >= diffusion.boundary_ratio and "low" below it (diffusers' transformer / transformer_2).
  model.experts = 1

  # ---------------------------------------------------------------- diffusion (flow matching)
  diffusion = config.diffusion = ml_collections.ConfigDict()
  diffusion.sigma_sampling = "logit_normal"  # uniform | logit_normal | mode
  diffusion.logit_mean = 0.0  # mean m of the logit-normal sigma density
  diffusion.logit_std = 1.0  # std s of the logit-normal sigma density
  diffusion.mode_scale = 1.29  # scale of the SD3 mode density, in [-1, 2/(pi-2)]; 0 = uniform
  diffusion.shift = 1.0  # training shift s in sigma' = s*sigma/(1+(s-1)*sigma); 1 = none
  diffusion.shift_from_tokens = False  # derive the training shift from tokens per clip instead
  diffusion.final_shift = 0.0  # > 0: training shift of the last final_shift_fraction of the steps
  diffusion.final_shift_fraction = 0.15  # share of train.num_steps trained with final_shift
  diffusion.base_shift_tokens = 256  # tokens per clip at which the derived shift is base_shift
  diffusion.max_shift_tokens = 4096  # tokens per clip at which the derived shift is max_shift
  diffusion.base_shift = 1.0  # derived shift at base_shift_tokens
  diffusion.max_shift = 3.0  # derived shift at max_shift_tokens
  diffusion.num_train_timesteps = 1000  # timestep = num_train_timesteps * sigma (Wan convention)
  diffusion.caption_dropout = 0.1  # probability of replacing a caption by the empty text
  diffusion.sampler = "unipc"  # euler | unipc
  diffusion.sample_steps = 50  # sampler steps at inference
  diffusion.sample_shift = 3.0  # inference flow shift (3.0 for 480p, 5.0 for 720p in Wan)
  diffusion.guidance_scale = 5.0  # classifier-free guidance scale; 1 = no guidance
  # model.experts = 2: the high-noise expert denoises timesteps >= boundary_ratio * num_train_timesteps
  # (WanPipeline's rule; 0.875 is Wan2.2 T2V-A14B's, 0.9 I2V-A14B's), the low-noise one the rest, with
  # guidance_scale_2 (< 0 = guidance_scale).
  diffusion.boundary_ratio = 0.875
  diffusion.guidance_scale_2 = -1.0

  # ---------------------------------------------------------------- data (latent clip datasets)
  data = config.data = ml_collections.ConfigDict()
  data.dir = ""  # prepared dataset directory (output of sora_jax.prepare); one-source shorthand
  # A mixture of prepared datasets: ((path, weight), ...) or (path, weight, caption_dropout) entries.
  # Batches (clips when packing) draw a source by weight on a seeded schedule; caption_dropout
  # overrides diffusion.caption_dropout for that source's clips. Set this or data.dir, not both.
  data.sources = ()
  data.train_split = "train"  # split the trainer reads
  data.eval_split = "validation"  # held-out split the eval binary scores
  data.eval_fraction = 0.05  # fraction of clips prepare puts in the eval split
  data.fps = 16  # frames per second clips are sampled at
  data.clip_stride_s = 2.0  # seconds between starts of consecutive clips of one video
  # video buckets as (frames, height, width) in pixels; prepare picks the nearest by aspect ratio
  data.buckets = ((33, 480, 832), (33, 832, 480), (33, 624, 624))
  data.image_buckets = ((1, 480, 832), (1, 832, 480), (1, 624, 624))  # 1-frame image buckets
  data.image_ratio = 0.0  # fraction of batches drawn from image buckets
  data.record_dtype = "bfloat16"  # on-disk dtype of latents and text embeddings (bfloat16|float16)
  # A diffusers Wan pipeline directory (vae/, text_encoder/, tokenizer/spiece.model[, transformer/]):
  # prepare, eval and sample take the Wan VAE, umT5 and tokenizer from it. Empty = no pretrained encoders.
  data.pretrained = ""
  data.encoder_dtype = "float32"  # compute dtype of the VAE and text encoder (float32 | bfloat16)
  data.vae = "wan"  # wan | pixel (the demo's invertible downsample + space-to-depth)
  data.vae_spatial_factor = 8  # pixels per latent cell along height and width
  data.vae_temporal_factor = 4  # frames per latent frame (after the first)
  data.text_encoder = "umt5"  # umt5 | tiny_umt5 (seeded small encoder for the demo)
  data.text_encoder_layers = 2  # tiny_umt5 encoder blocks (umt5 is fixed at umT5-XXL's 24)
  data.text_encoder_heads = 4  # tiny_umt5 attention heads; width is model.text_dim
  data.text_encoder_ffn_dim = 256  # tiny_umt5 gated-GELU hidden width
  data.text_encoder_seed = 0  # seed of the tiny_umt5 weights (never trained; fixed per dataset)
  data.text_encoder_position_bias_std = 0.0  # tiny_umt5 relative position bias init std; 0 = umT5's
  data.text_len = 512  # text tokens per caption (padded / truncated)
  data.tokenizer = ""  # sentencepiece .model path; empty = train one on the captions (demo)
  data.vocab_size = 256384  # tokenizer vocabulary size
  data.shards = 16  # ArrayRecord shards prepare writes per split
  data.prepare_workers = 0  # prepare worker processes; 0 = all local cores
  data.shuffle_seed = 0  # seed of the global shuffle (differs per epoch)
  data.validation = "error"  # per-record check failure policy: error | skip
  # A recaptioned captions file (sora_jax.recaption) has a dense `caption` and the short
  # `original_caption`: prepare gives a clip its original caption with this probability, so the model
  # also learns to follow short prompts (DALL-E 3 trains on both).
  data.original_caption_prob = 0.0
  data.packing = False  # pack clips of different shapes into a fixed token budget
  data.token_budget = 4096  # tokens per packed sequence when packing
  data.max_segments = 8  # most clips in one packed row (its text holds max_segments * text_len tokens)
  data.worker_count = 0  # grain prefetch worker processes; 0 = read in the main process
  data.prefetch_buffer = 2  # batches grain keeps ready per worker
  data.read_threads = 4  # threads reading batches in each process (or each worker)
  data.malloc_mmap_threshold_mb = 32  # glibc: heap-serve and reuse blocks below this (MB); 0 = malloc as is

  # ---------------------------------------------------------------- mesh (device layout)
  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.axes = ("data", "fsdp", "context", "tensor")  # mesh axis names, outermost first
  mesh.ici = (1, -1, 1, 1)  # per-slice sizes of mesh.axes; one -1 fills the remaining devices
  mesh.dcn = (1, 1, 1, 1)  # across-slice (data-center network) sizes of mesh.axes
  # The TPU slice the config is sized for (e.g. "v5p-64"): `sora_jax.compile` checks it without --topology.
  mesh.target_topology = ""
  # logical axis -> mesh axes; the one table that maps model names onto the mesh
  # Activations (`act_*`) and parameters have their own names, so no rule's order decides a placement.
  mesh.logical_axis_rules = (
      ("act_batch", ("data", "fsdp")),
      ("act_seq", "context"),
      ("act_text_seq", None),
      ("act_embed", None),  # the residual stream: whole on every device of a batch shard
      ("act_heads", "tensor"),
      ("act_head_dim", None),
      ("act_mlp", "tensor"),
      ("act_temb", "tensor"),  # the timestep MLP's hidden width
      # Parameters also over `context`: its devices share a batch, so they can share the weights too.
      ("embed", ("fsdp", "context")),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
      ("mlp", "tensor"),
      ("layers", None),
      ("channels", None),
      ("text_embed", None),
      ("modulation", None),
      ("patch", None),
  )

  # ---------------------------------------------------------------- train
  train = config.train = ml_collections.ConfigDict()
  train.num_steps = 1000  # optimizer steps to run
  train.global_batch_size = 8  # clips per step over all devices (before accumulation splits it)
  train.grad_accum_steps = 1  # micro-batches per optimizer step
  train.seed = 0  # seed of parameters, noise and sigma
  # Start from pretrained DiT weights: a Wan pipeline directory or its transformer/ (diffusers or original
  # Wan2.1 layout), whose config.json gives the model's shape fields; or a sora_jax run directory, RUN or
  # RUN@STEP (the next stage of a recipe: resolution, frames, buckets, data and schedule may change, the
  # parameter shapes may not), pinned to RUN@STEP in this run's config. A run that has checkpoints
  # resumes from them instead.
  train.init_from = ""
  train.init_weights = "raw"  # from a run: raw | ema_<decay> (one of its train.ema_decays), e.g. ema_0.999
  # From a run: restart (fresh AdamW state, EMA trees = the starting weights) | carry (its AdamW moments
  # and step count, and its EMA trees, which need the same optimizer and ema_decays).
  train.init_optimizer = "restart"
  # LoRA: with lora_rank > 0 the run trains low-rank adapters (x·A·B · lora_alpha/lora_rank added to a
  # projection's output) on the frozen weights train.init_from names; only the adapters are in the
  # optimizer, the EMA and the checkpoints. lora_targets: regexes searched in each projection's
  # '/'-joined path (scanned or not: `blocks/attn1/to_q`, `blocks/ffn/proj_in`, `proj_out`).
  train.lora_rank = 0
  train.lora_alpha = -1.0  # < 0: the rank (scale 1)
  train.lora_targets = (r"attn[12]/to_(q|k|v|out)$", r"ffn/proj_(in|out)$")
  train.lora_base_dtype = "float32"  # dtype the frozen weights are held in: float32 | bfloat16
  train.learning_rate = 1e-4  # peak learning rate
  train.warmup_steps = 100  # linear warmup steps
  train.schedule = "constant"  # constant | cosine | wsd (after warmup)
  train.end_lr_ratio = 0.0  # final lr of the cosine / wsd decay as a fraction of the peak
  train.decay_fraction = 0.2  # wsd: the lr decays over this last fraction of num_steps
  train.weight_decay = 0.01  # AdamW decay (not applied to norms, biases, modulation tables)
  # ((regex, factor), ...): learning rate x factor for parameters whose '/'-joined path matches the
  # regex (first match wins), e.g. (("norm_[qk]", 10.0), ("patch_embedding", 0.5))
  train.lr_multipliers = ()
  train.b1 = 0.9  # AdamW beta1
  train.b2 = 0.999  # AdamW beta2
  train.adam_eps = 1e-8  # AdamW epsilon
  train.grad_clip = 1.0  # global-norm clip; 0 = off
  train.ema_decays = (0.999,)  # one EMA tree per decay; empty = no EMA
  # Parts of the state held in host memory between steps ("ema", "opt_state"): they visit the
  # accelerator only for the update at the end of a step, leaving its HBM to the forward/backward pass.
  # "frozen" (LoRA): the frozen projection kernels, each brought to the device by its layer as it runs.
  train.host_state = ()
  train.max_nonfinite_steps = 10  # consecutive skipped steps before rolling back to a checkpoint
  # Loss-spike guard: skip an update whose gradient norm exceeds the running mean by this many standard
  # deviations (0 = off), once spike_warmup_steps applied steps have been seen; statistics forget
  # with spike_decay. Skips count in skipped_steps and the `spike_steps` metric.
  train.spike_sigmas = 0.0
  train.spike_warmup_steps = 100
  train.spike_decay = 0.99
  # Given frames (image-to-video, video extension; Wan2.2 TI2V): this fraction of video clips keeps its
  # first k latent frames clean (timestep 0 on their tokens, no loss on them), k drawn uniformly from
  # condition_frames (1 = image-to-video; more = extension). 0 = text-to-video only.
  train.condition_prob = 0.0
  train.condition_frames = (1,)
  # model.experts = 2: the experts this run trains ("high", "low"). Each step trains one of them, drawn
  # by the training sigma density's mass on its side of the boundary, on sigmas of its range only; an
  # expert left out is frozen (no optimizer state, no EMA) and still samples.
  train.train_experts = ("high", "low")
  train.log_every = 10  # steps between metrics.jsonl / TensorBoard records
  train.sigma_buckets = 10  # sigma buckets of the per-bucket training loss
  # Multi-process jobs: a process silent this long is lost and every other one exits (code 75) with
  # one line naming it; the restarted job resumes from the newest committed checkpoint.
  train.peer_timeout_s = 120
  train.fast_compile = False  # XLA optimisation level 0 for init and step: faster CPU compiles, slower steps

  # ---------------------------------------------------------------- eval
  eval_ = config.eval = ml_collections.ConfigDict()
  eval_.num_examples = 64  # held-out clips scored per checkpoint
  eval_.batch_size = 8  # clips per eval step
  eval_.sigma_grid = 10  # fixed sigma values (bucket centres) the val loss is measured at
  eval_.seed = 1234  # seed of the fixed eval noise and of the sample videos
  eval_.prompts = ("a red circle moves left on a blue background",)  # captions to sample
  eval_.negative_prompt = ""  # negative prompt for classifier-free guidance
  eval_.num_frames = 33  # pixel frames of eval samples
  eval_.height = 480  # pixel height of eval samples
  eval_.width = 832  # pixel width of eval samples
  eval_.watch_interval_s = 60.0  # seconds between polls in --watch mode
  # Prompts sampled per sampler call (rounded up to a multiple of the batch shards; 0 = one per shard).
  # Each call's videos are decoded, scored and written before the next, so memory does not grow with the
  # number of prompts; larger calls are faster where the sampled batch fits the devices.
  eval_.sample_batch_size = 0
  eval_.adherence_prompts = 0  # extra seeded synthetic-data prompts sampled to score prompt adherence
  # Continuation: this many held-out clips are sampled again from their first eval.continue_frames latent
  # frames and their captions (image-to-video for 1, extension for more); on the synthetic data the
  # detector compares what the generated frames show with the real clip. 0 = off.
  eval_.continue_clips = 0
  eval_.continue_frames = (1,)
  # A prompt suite: a JSONL file of {"prompt", optional "dimension", "negative_prompt", "seed"} sampled in
  # place of eval.prompts; scores are also reported per dimension. configs/prompts/video_suite.jsonl ships.
  eval_.prompt_file = ""
  # FVD of every weight set's samples against held-out clips: a transformers VideoMAE directory or an I3D
  # TorchScript file; "" = off. The reference statistics are computed once and cached under W/eval/.
  eval_.fvd_model = ""
  eval_.fvd_reference_clips = 64  # held-out clips (decoded by the VAE) behind FVD's reference statistics
  # CLIP score (text-video similarity) and frame consistency of every sample: a transformers CLIP or
  # SigLIP directory; "" = off.
  eval_.clip_model = ""
  eval_.clip_frames = 8  # frames spread over each sample that the CLIP score reads

  # ---------------------------------------------------------------- checkpoint
  checkpoint = config.checkpoint = ml_collections.ConfigDict()
  checkpoint.every_steps = 500  # save every N steps (also at the end and on SIGTERM)
  checkpoint.keep_last = 3  # keep the newest K checkpoints
  checkpoint.keep_every = 0  # also keep every M-th step forever; 0 = none
  checkpoint.async_save = True  # write checkpoints in the background
  checkpoint.max_failed_saves = 3  # failed saves in a row (disk full, permissions) before the run stops
  # Reads of a checkpoint step at restore: a step is damaged only when its read fails the same way on
  # consecutive attempts; other failures are retried (waits double from read_backoff_s) and then stop
  # the job without setting anything aside.
  checkpoint.read_attempts = 3
  checkpoint.read_backoff_s = 2.0

  return config
