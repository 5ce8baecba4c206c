"""One typed config for every hpc_asr CLI.

A config is YAML with one mapping per section (``features``, ``data``, ``specaug``, ``model``,
``train``, ``dist``, ``export``, ..., ``serve``), overridden from the command line as ``--section.key value`` or
``--section.key=value``. Unknown sections or keys fail with the offending name, because a typo
that silently falls back to a default wastes a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from hpc_asr.validate import ConfigError, validate

__all__ = ["AugmentConfig", "Config", "ConfigError", "DataConfig", "DecodeConfig", "DistConfig", "ExportConfig",
           "FeatureConfig", "ModelConfig", "ServeConfig", "SpecAugConfig", "TrainConfig"]


@dataclass
class FeatureConfig:
    """Kaldi-compatible log-mel filterbank settings; stored in every HDF5 shard."""

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    dither: float = 0.0  # 0 keeps features deterministic (reproducible shards, exact parity tests)
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 means Nyquist + high_freq, as in Kaldi
    backend: str = "torch"  # torch | kaldi_native | torchaudio: same features, see hpc_asr.data.features
    max_duration: float = 60.0  # seconds; longer audio is rejected at prep (0 = no limit)

    def __post_init__(self) -> None:
        validate(self, "features", sample_rate=">0", num_mel_bins=">0", frame_length_ms=">0",
                 frame_shift_ms=">0", dither=">=0", low_freq=">=0")
        if self.frame_shift_ms > self.frame_length_ms:
            raise ConfigError(f"features.frame_shift_ms={self.frame_shift_ms} > frame_length_ms={self.frame_length_ms}")
        if self.backend not in ("torch", "kaldi_native", "torchaudio"):
            raise ConfigError(f"features.backend: {self.backend!r}, expected torch, kaldi_native or torchaudio")

    def differences(self, other: FeatureConfig) -> str:
        """The fields that differ, as ``num_mel_bins 80 vs 40`` (self's value first)."""
        return ", ".join(f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}"
                         for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name))


@dataclass
class DataConfig:
    """Where the prepared features live and how batches are formed."""

    train: str = "data/va/fbank/train"  # a directory holding index.json + shard HDF5 files
    dev: str = "data/va/fbank/dev"
    test: str = "data/va/fbank/test"
    max_frames: int = 12000  # per batch per rank, input frames incl. padding
    max_utts: int = 64  # per batch per rank
    bucket_size: int = 400  # utterances sorted by length within buckets of this size
    num_workers: int = 0  # loader processes reading/collating/augmenting training batches (0 = in-process)

    def __post_init__(self) -> None:
        validate(self, "data", max_frames=">0", max_utts=">0", bucket_size=">0", num_workers=">=0")


@dataclass
class SpecAugConfig:
    """SpecAugment on the training features (off for dev/test)."""

    enabled: bool = True
    freq_masks: int = 2
    freq_width: int = 10
    time_masks: int = 2
    time_width: float = 0.05  # fraction of the utterance length
    freq_warp: float = 0.0  # max relative stretch of the mel axis per utterance (0 = off)

    def __post_init__(self) -> None:
        validate(self, "specaug", freq_masks=">=0", freq_width=">=0", time_masks=">=0", time_width="[0,1]",
                 freq_warp="[0,1)")


@dataclass
class ModelConfig:
    """Conformer-CTC encoder; vocab_size comes from the tokenizer at train time."""

    d_model: int = 144
    n_heads: int = 4
    n_layers: int = 6
    ff_mult: int = 4
    conv_kernel: int = 15
    conv_norm: str = "layer"  # layer | batch: normalisation after the depthwise convolution
    subsampling: str = "conv2d"  # conv2d (classic) | conv1d (time-only, far cheaper on CPU)
    subsample_factor: int = 4  # frames per output frame: 4, or 2 (conv1d only; better for characters)
    subsample_channels: int = 64  # conv2d only
    dropout: float = 0.1
    vocab_size: int = 0
    attention: str = "abs"  # abs (sinusoids added to the input) | rel (Transformer-XL relative positions, as WeNet)
    cmvn: str = "global"  # global | utterance_mean | utterance: then per-utterance mean (and variance)
    # Streaming (WeNet U2-style chunks; docs/streaming.md): causal depthwise convolution, attention over the
    # current chunk + left_chunks chunks, dynamic chunk size in training; full context remains available.
    streaming: bool = False
    chunk_size: int = 16  # decoding chunk in output frames (16 x 40 ms = 640 ms at subsample_factor 4)
    left_chunks: int = 4  # chunks of left context kept in the attention cache
    max_train_chunk: int = 25  # dynamic chunk training draws 1..max_train_chunk (or full context, ~half the batches)

    def __post_init__(self) -> None:
        validate(self, "model", d_model=">0", n_heads=">0", n_layers=">0", ff_mult=">0", conv_kernel=">0",
                 subsample_channels=">0", dropout="[0,1)", vocab_size=">=0", chunk_size=">=1", left_chunks=">=1",
                 max_train_chunk=">=1")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} not divisible by n_heads={self.n_heads}")
        if self.subsampling not in ("conv2d", "conv1d"):
            raise ConfigError(f"model.subsampling must be conv2d|conv1d, got {self.subsampling!r}")
        if self.subsample_factor not in (2, 4) or (self.subsampling == "conv2d" and self.subsample_factor != 4):
            raise ConfigError(f"model.subsample_factor={self.subsample_factor}: conv1d takes 2 or 4, conv2d only 4")
        if self.conv_norm not in ("layer", "batch"):
            raise ConfigError(f"model.conv_norm must be layer|batch, got {self.conv_norm!r}")
        if self.conv_kernel % 2 == 0:
            raise ConfigError(f"model.conv_kernel={self.conv_kernel} must be odd")
        if self.attention not in ("abs", "rel"):
            raise ConfigError(f"model.attention must be abs|rel, got {self.attention!r}")
        if self.cmvn not in ("global", "utterance_mean", "utterance"):
            raise ConfigError(f"model.cmvn must be global|utterance_mean|utterance, got {self.cmvn!r}")
        if self.streaming and self.cmvn != "global":
            raise ConfigError(f"model.cmvn={self.cmvn!r} needs the whole utterance; model.streaming needs global")
        if self.streaming and self.conv_kernel < 2:
            raise ConfigError(f"model.conv_kernel={self.conv_kernel}: model.streaming needs >= 3 (a conv cache)")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping."""

    out_dir: str = "runs/demo"
    epochs: int = 10
    lr: float = 2e-3  # peak LR at train.ref_batch_frames (see lr_scaling)
    lr_scaling: str = "none"  # none | linear | sqrt: peak LR x (global batch / ref_batch_frames)^{0, 1, 1/2}
    ref_batch_frames: int = 6000  # the global batch (max_frames x accum_steps x ranks) that `lr` is tuned for
    warmup_steps: int = 300  # in optimizer steps of the first run's global batch (kept across world sizes)
    weight_decay: float = 1e-3
    grad_clip: float = 5.0
    accum_steps: int = 1  # gradient accumulation: optimizer step every N batches
    precision: str = "fp32"  # fp32 | fp16 (autocast + GradScaler) | bf16 (autocast, no scaler)
    amp: bool = False  # legacy switch: true with precision fp32 = fp16 on CUDA, bf16 on CPU
    seed: int = 0
    log_every: int = 20
    threads: int = 0  # torch intra-op threads per rank; 0 = cores / local ranks
    max_steps: int = 0  # stop after N optimizer steps (0 = run all epochs); for smoke tests
    # stop after this much training wall time (0 = off), all ranks at one optimizer step; the LR's
    # cosine then runs over time, not steps (hpc_asr.train.schedule). `make demo` derives it from
    # its 30-minute deadline, so a slower machine trains fewer steps and still finishes in time.
    time_budget_s: float = 0.0
    resume: bool = True  # continue from out_dir/last.pt when it exists
    ckpt_every_steps: int = 0  # also checkpoint every N optimizer steps (0 = at epoch ends only)
    keep_last: int = 3  # step checkpoints kept (step-NNNNNNNN.pt); older ones are deleted
    average_last: int = 0  # write avg.pt = mean of the last N step checkpoints at the end (0 = off)
    tensorboard: bool = True  # TensorBoard event files in out_dir/tb (rank 0) when tensorboard is installed
    progress: bool = True  # progress bar on rank 0 when stderr is a terminal
    tokenizer: str = "char"  # char | bpe (sentencepiece, trained on the training transcripts)
    bpe_vocab_size: int = 256
    compile: bool = False  # torch.compile the model (measure first: off unless it pays)

    def __post_init__(self) -> None:
        validate(self, "train", epochs=">=1", lr=">0", lr_scaling=("none", "linear", "sqrt"),
                 ref_batch_frames=">0", warmup_steps=">=0", weight_decay=">=0", grad_clip=">0",
                 accum_steps=">=1", precision=("fp32", "fp16", "bf16"), seed=">=0", log_every=">=1",
                 threads=">=0", max_steps=">=0", time_budget_s=">=0", ckpt_every_steps=">=0", keep_last=">=1",
                 average_last=">=0", tokenizer=("char", "bpe"), bpe_vocab_size=">=1")
        if self.out_dir == "":
            raise ConfigError("train.out_dir must not be empty")
        if self.average_last > self.keep_last:
            raise ConfigError(f"train.average_last={self.average_last} > train.keep_last={self.keep_last}: "
                              "only the last keep_last step checkpoints exist to average")
        if self.average_last and not self.ckpt_every_steps:
            raise ConfigError("train.average_last needs train.ckpt_every_steps > 0 (it averages step checkpoints)")
        if self.precision != "fp32" and self.amp:
            raise ConfigError(f"train.amp=true conflicts with train.precision={self.precision!r}; set one")

    def autocast_dtype(self, device_type: str):
        """The autocast dtype of this precision (None for fp32), for training and for scoring alike:
        the legacy ``amp: true`` means fp16 on CUDA and bf16 on CPU."""
        import torch

        p = self.precision
        if p == "fp32" and self.amp:
            p = "fp16" if device_type == "cuda" else "bf16"
        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[p]

@dataclass
class DistConfig:
    """Distributed engine and Horovod knobs; rank detection lives in hpc_asr.dist.launch.

    Horovod knobs are exported as HOROVOD_* variables before ``hvd.init()``; a variable already in
    the environment wins over the config."""

    engine: str = "auto"  # auto (what the launcher implies) | horovod | torch | none
    compression: str = "fp16"  # fp16 | none: gradient compression on the wire
    fusion_threshold_mb: float = 0.0  # HOROVOD_FUSION_THRESHOLD; 0 = Horovod's default (64 MB)
    cycle_time_ms: float = 0.0  # HOROVOD_CYCLE_TIME; 0 = 5 ms on CPU nodes, Horovod's 1 ms on GPUs
    hierarchical_allreduce: bool = False  # HOROVOD_HIERARCHICAL_ALLREDUCE: reduce in-node, then across
    timeline: str = ""  # HOROVOD_TIMELINE: Chrome-trace JSON of every collective, written by rank 0
    gradient_predivide_factor: float = 0.0  # divide before the sum, rest after; 0 = world size with fp16
    # Horovod elastic: launch with horovodrun --min-np/--max-np --host-discovery-script; the state is
    # committed (in memory) at every checkpoint boundary and ranks may leave or join there.
    elastic: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ("auto", "horovod", "torch", "none"):
            raise ConfigError(f"dist.engine must be auto|horovod|torch|none, got {self.engine!r}")
        if self.elastic and self.engine not in ("auto", "horovod"):
            raise ConfigError(f"dist.elastic needs dist.engine horovod (or auto), got {self.engine!r}")
        if self.compression not in ("fp16", "none"):
            raise ConfigError(f"dist.compression must be fp16|none, got {self.compression!r}")
        for key in ("fusion_threshold_mb", "cycle_time_ms", "gradient_predivide_factor"):
            if getattr(self, key) < 0:
                raise ConfigError(f"dist.{key} must be >= 0, got {getattr(self, key)!r}")


@dataclass
class ExportConfig:
    """ONNX export and parity tolerance."""

    opset: int = 17
    atol: float = 1e-3  # max abs log-prob difference accepted between PyTorch and ONNX Runtime

    def __post_init__(self) -> None:
        validate(self, "export", opset=">=1", atol=">0")


@dataclass
class DecodeConfig:
    """CTC decoding at evaluation (hpc_asr.decode.ctc); LM weights are tuned on dev by hpc_asr.decode.ngram."""

    decoder: str = "greedy"  # greedy | beam (prefix beam search) | beam+lm (word n-gram LM, lexicon)
    beam_size: int = 32  # hypotheses kept per frame
    token_beam: int = 0  # tokens tried per hypothesis and frame, the best first (0 = all)
    lm: str = ""  # ARPA file or directory holding lm.arpa (+ decode.json); "" = <checkpoint dir>/lm
    hotwords: str = ""  # comma-separated words (contact names) to favour in beam+lm
    hotword_score: float = 0.0  # extra log-score per hotword occurrence

    def __post_init__(self) -> None:
        if self.decoder not in ("greedy", "beam", "beam+lm"):
            raise ConfigError(f"decode.decoder must be greedy|beam|beam+lm, got {self.decoder!r}")
        if self.beam_size < 1:
            raise ConfigError(f"decode.beam_size must be >= 1, got {self.beam_size}")
        if self.token_beam < 0:
            raise ConfigError(f"decode.token_beam must be >= 0 (0 = every token), got {self.token_beam}")


@dataclass
class AugmentConfig:
    """Waveform augmentation before feature prep (data_prep.augment), the Kaldi way: augmented
    copies of the training audio plus a combined manifest. Each part switches off on its own."""

    enabled: bool = False
    copies: int = 1  # augmented copies per training utterance (the original is always kept)
    seed: int = 0  # with the utterance's position, fixes every random choice
    speeds: str = "0.9,1.0,1.1"  # speed factors, one drawn per copy (resampling: tempo and pitch); "" = off
    noise_prob: float = 0.5  # share of copies with additive noise (0 = off)
    noise_types: str = "white,pink,brown,babble"  # coloured noise, or babble of other training utterances
    snr_db_min: float = 5.0
    snr_db_max: float = 25.0
    babble_speakers: int = 4  # utterances summed into one babble
    reverb_prob: float = 0.3  # share of copies convolved with a simulated room impulse response (0 = off)
    rt60_min: float = 0.15  # seconds, reverberation time of the simulated rooms
    rt60_max: float = 0.7
    rirs: int = 40  # size of the room impulse response bank (pyroomacoustics image-source rooms)

    def __post_init__(self) -> None:
        for name in ("noise_prob", "reverb_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.copies < 0 or self.babble_speakers < 1 or self.rirs < 1:
            raise ConfigError(f"augment: copies >= 0, babble_speakers >= 1, rirs >= 1, got {self}")
        if self.snr_db_min > self.snr_db_max or not 0 < self.rt60_min <= self.rt60_max:
            raise ConfigError(f"augment: snr_db_min <= snr_db_max and 0 < rt60_min <= rt60_max, got {self}")
        try:
            bad = [f for f in (float(x) for x in self.speeds.split(",") if x.strip()) if not 0.5 <= f <= 2.0]
        except ValueError:
            raise ConfigError(f"augment.speeds: comma-separated numbers, got {self.speeds!r}") from None
        if bad:
            raise ConfigError(f"augment.speeds: factors must lie in [0.5, 2], got {bad}")
        unknown = set(self.noise_types.split(",")) - {"white", "pink", "brown", "babble", ""}
        if unknown:
            raise ConfigError(f"augment.noise_types: unknown {sorted(unknown)}; use white, pink, brown, babble")


@dataclass
class ServeConfig:
    """The recognition service (``hpc-asr serve``, hpc_asr.deploy.serve): where it listens, the
    ONNX Runtime threads, dynamic batching, partial transcripts, and every limit a client meets.
    The decoder is ``decode.decoder`` (greedy | beam | beam+lm with the LM beside the export)."""

    host: str = "127.0.0.1"  # loopback unless told: an inference node's service sits behind its own proxy
    port: int = 8000
    provider: str = "auto"  # auto (CUDA where onnxruntime-gpu sees a GPU, else CPU) | cpu | cuda
    intra_threads: int = 1  # ONNX Runtime threads per model run
    inter_threads: int = 1
    feature_threads: int = 1  # torch threads for FBANK (computed off the event loop)
    max_batch: int = 8  # offline requests (and streams' partial decodes) run as one padded batch
    max_batch_frames: int = 12000  # a batch stops growing at this many padded input frames
    max_wait_ms: float = 0.0  # how long a lone request waits for company (0: batch what queued while the model ran)
    max_body_bytes: int = 10_000_000  # POST /v1/recognize body (413 above)
    max_audio_s: float = 60.0  # offline request and whole stream (413 / close 4413 above)
    max_streams: int = 16  # concurrent WebSocket streams (429 / close 4429 above)
    max_queue: int = 256  # requests waiting for the model (503 above: shed load rather than time out)
    partial_interval_s: float = 0.5  # re-decode the stream's audio so far after this much new audio
    streaming: str = "auto"  # auto: chunked streams where the export has streaming.onnx | off: always re-decode
    idle_timeout_s: float = 10.0  # a stream that sends nothing this long is closed (4408)
    drain_timeout_s: float = 30.0  # on SIGTERM, in-flight requests get this long to finish

    def __post_init__(self) -> None:
        if self.streaming is False or self.streaming == "False":  # YAML reads a bare `off` as false
            self.streaming = "off"
        validate(self, "serve", port=">=0", intra_threads=">=0", inter_threads=">=0", feature_threads=">=1",
                 max_batch=">=1", max_batch_frames=">0", max_wait_ms=">=0", max_body_bytes=">0",
                 max_audio_s=">0", max_streams=">=1", max_queue=">=1", partial_interval_s=">0",
                 idle_timeout_s=">0", drain_timeout_s=">=0", provider=("auto", "cpu", "cuda"),
                 streaming=("auto", "off"))
        if self.port > 65535:
            raise ConfigError(f"serve.port must be <= 65535, got {self.port}")


@dataclass
class Config:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    specaug: SpecAugConfig = field(default_factory=SpecAugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        # dist's numeric knobs all mean "0 = the default": types checked, negatives refused.
        hints = typing.get_type_hints(type(self.dist))
        validate(self.dist, "dist", **{f.name: ">=0" for f in dataclasses.fields(self.dist)
                                       if hints[f.name] in (int, float)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str = "config") -> Config:
        raw = dict(raw or {})
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; expected {sorted(sections)}")
        built = {}
        for name, f in sections.items():
            section_cls = f.default_factory  # type: ignore[misc]
            built[name] = _build_section(section_cls, raw.get(name) or {}, f"{where}: {name}")
        try:
            return cls(**built)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _build_section(section_cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(section_cls)
    names = {f.name for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected one of {sorted(names)}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        return section_cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{where.rpartition(': ')[0] or where}: {e}") from None


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert YAML/CLI values to the declared field type (bool/int/float/str)."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if typ is str:
        return str(value)
    return value
