"""The three scorers under PyTriton, bound as the CosyVoice2 GRPO recipe binds its reward model.

    python bench/peers_pytriton.py --http-port P --grpc-port P --metrics-port P --report-dir DIR

Runs in its own environment (bench/peers.py makes it). Each scorer is one Triton model with
`ModelConfig(max_batch_size=32, batcher=DynamicBatcher(max_queue_delay_microseconds=10000))`, an
`@batch` infer function and strict=True, one instance: examples/grpo/cosyvoice2/token2wav_asr_server.py.
Inputs are BYTES tensors [batch, 1] named after the item's fields in capitals (AUDIO: a WAV file,
REFERENCE_TEXT: UTF-8); outputs are one FP64 or BYTES tensor per compared field (TRANSCRIPT, WER,
REWARD, ...) and ERROR (empty, or "CODE: message" for an item that failed).
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

import numpy as np
from peers_serving import AUDIO_FIELDS, COMPARED, MAX_BATCH_SIZE, MAX_WAIT_S, SCORER_NAMES, TEXT_FIELDS, BatchFn, build
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def infer_function(scorer: str, score: BatchFn) -> Any:
    """The @batch infer function of one scorer: tensors in, the engine's batch, tensors out."""
    fields = AUDIO_FIELDS[scorer] + TEXT_FIELDS[scorer]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values())))
        items = [{name: (inputs[name.upper()][r, 0] if name in AUDIO_FIELDS[scorer]
                         else inputs[name.upper()][r, 0].decode()) for name in fields} for r in range(rows)]
        results = score(items)
        outputs: dict[str, np.ndarray] = {}
        for name, tolerance in COMPARED[scorer].items():
            values = [r["score"][name] if "score" in r else (b"" if tolerance == 0 else np.nan) for r in results]
            outputs[name.upper()] = (np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=object)
                                     if tolerance == 0 else np.array(values, dtype=np.float64).reshape(-1, 1))
        errors = [f"{r['error']['code']}: {r['error']['message']}" if "error" in r else "" for r in results]
        outputs["ERROR"] = np.array([[e.encode()] for e in errors], dtype=object)
        return outputs

    return infer


def bind(triton: Triton, scorer: str, score: BatchFn) -> None:
    fields = AUDIO_FIELDS[scorer] + TEXT_FIELDS[scorer]
    outputs = [Tensor(name=n.upper(), dtype=bytes if tol == 0 else np.float64, shape=(1,))
               for n, tol in COMPARED[scorer].items()]
    triton.bind(model_name=scorer, infer_func=infer_function(scorer, score),
                inputs=[Tensor(name=n.upper(), dtype=bytes, shape=(1,)) for n in fields],
                outputs=[*outputs, Tensor(name="ERROR", dtype=bytes, shape=(1,))],
                config=ModelConfig(max_batch_size=MAX_BATCH_SIZE,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=int(MAX_WAIT_S * 1e6))),
                strict=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--report-dir", required=True)
    args = parser.parse_args()
    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_verbose=0,
                          exit_timeout_secs=5)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Triton(config=config) as triton:
        for scorer in SCORER_NAMES:
            bind(triton, scorer, build(scorer, "pytriton", args.report_dir))
        triton.run()
        stop.wait()


if __name__ == "__main__":
    main()
