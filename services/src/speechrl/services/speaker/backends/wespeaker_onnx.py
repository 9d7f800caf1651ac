"""wespeaker models exported to ONNX (wespeaker/bin/export_onnx.py; the files sherpa-onnx loads).

The graph takes "feats" float32 [B, T, F] (Kaldi fbank after CMN) and returns "embs" [B, D],
not normalised; this backend L2-normalises. Feature settings come from the model: the
metadata_props that sherpa-onnx's add_meta_data scripts write (sample_rate, normalize_samples,
output_dim, framework; also feat_dim / num_mel_bins, frame_length_ms, frame_shift_ms,
window_type when present) and the input's static feature dimension; FbankSettings defaults fill
the rest. Utterances of equal frame count share one session.run (see run_grouped_by_length).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from speechrl.services.speaker.backends import intra_op_threads, l2_normalize, run_grouped_by_length
from speechrl.services.speaker.features import MIN_FBANK_FRAMES, FbankSettings, kaldi_fbank, min_fbank_samples

log = logging.getLogger(__name__)

def session_options(threads: int) -> ort.SessionOptions:
    """CPU-friendly session options: intra-op = threads (or cores), one inter-op thread."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads(threads)
    # One model call at a time (the batcher's thread); parallel branches would fight for the cores.
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """Execution providers for a config device: CPU, or CUDA device N (then CPU for unsupported ops)."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(f"device {device!r} asked for, but this onnxruntime has no CUDAExecutionProvider; "
                           "install onnxruntime-gpu or use --device cpu")
    device_id = device.partition(":")[2] or "0"
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


class WespeakerOnnxBackend:
    """A wespeaker ONNX export run with onnxruntime.

    Usage (tests/service/test_speaker_backends.py exports a tiny model and runs this for real)::

        backend = WespeakerOnnxBackend("voxceleb_resnet34_LM.onnx")
        backend.embed([wav_16k]).shape  # (1, 256)
    """

    name = "wespeaker-onnx"

    def __init__(self, model_path: str = "", device: str = "cpu", threads: int = 0):
        path = Path(model_path)
        if not model_path or not path.is_file():
            raise FileNotFoundError(f"the wespeaker-onnx backend needs --model-path pointing at an .onnx file, "
                                    f"got {model_path!r}")
        self.path = path
        self.threads = threads
        self.providers = providers(device)  # fails now, not at the first batch, when CUDA is missing
        # A CPU session reads the metadata and runs CPU batches; a CUDA device gets its own
        # session in load_to_device, dropped again in offload.
        self.session = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.cpu_session = self.session
        self.model = str(path)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        framework = meta.get("framework", "")
        if framework and framework != "wespeaker":
            log.warning("%s says framework=%s; computing wespeaker-style fbank features for it", path, framework)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        feat_dim = model_input.shape[-1] if model_input.shape else None
        if isinstance(feat_dim, int) and not any(k in meta for k in ("feat_dim", "num_mel_bins", "feature_dim")):
            meta["feat_dim"] = str(feat_dim)  # the graph itself states how many mel bins it takes
        self.features = FbankSettings.from_metadata(meta)
        if isinstance(feat_dim, int) and feat_dim != self.features.num_mel_bins:
            raise ValueError(f"{path}: metadata says {self.features.num_mel_bins} mel bins but input "
                             f"{self.input_name!r} takes {feat_dim}")
        self.sample_rate = self.features.sample_rate
        self.min_seconds = min_fbank_samples(self.features, MIN_FBANK_FRAMES) / self.sample_rate
        self.dim = self._output_dim(meta)

    def load_to_device(self) -> None:
        """Open the CUDA session when the device is a GPU; nothing to do on the CPU."""
        if self.providers != ["CPUExecutionProvider"] and self.session is self.cpu_session:
            self.session = ort.InferenceSession(str(self.path), sess_options=session_options(self.threads),
                                                providers=self.providers)

    def offload(self, mode: str) -> None:
        """Close the CUDA session so its memory is free (both modes); the CPU session stays."""
        self.session = self.cpu_session

    def _output_dim(self, meta: dict[str, str]) -> int:
        static = self.session.get_outputs()[0].shape[-1]
        if isinstance(static, int):
            return static
        if meta.get("output_dim", "").isdigit():
            return int(meta["output_dim"])
        probe = np.zeros((1, 2 * MIN_FBANK_FRAMES, self.features.num_mel_bins), dtype=np.float32)
        return int(self._forward(probe).shape[-1])  # dynamic and undeclared: ask the graph

    def _forward(self, feats: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: feats})[0]  # [G, T, F] -> [G, D]
        return np.asarray(out, dtype=np.float32)

    def fbank(self, wav: np.ndarray) -> np.ndarray:
        """The model's input features of one waveform, [T, F] after CMN."""
        return kaldi_fbank(wav, self.features)

    def embed(self, audios: list[np.ndarray]) -> np.ndarray:
        """[N, D] float32 unit rows; one session.run per distinct frame count in the batch."""
        return l2_normalize(run_grouped_by_length([self.fbank(wav) for wav in audios], self._forward))
