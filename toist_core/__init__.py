"""toist_core: the TOIST network, its losses and distillation, data, evaluation and inference.

Plain PyTorch; importing it never imports ROS (nor torch: the inference API below is loaded on
first use).

    from toist_core import TaskSegmenter
    seg = TaskSegmenter.from_pretrained("toist_seg.pth", text_encoder="roberta-base", task=2)
    prediction = seg.predict(rgb_image)
"""

__version__ = "0.1.0"

_LAZY = {
    "TaskSegmenter": "toist_core.inference",
    "TaskState": "toist_core.inference",
    "Prediction": "toist_core.inference",
    "UntrainedTaskWarning": "toist_core.inference",
    "NonFiniteOutputError": "toist_core.inference",
    "SlowPrecisionWarning": "toist_core.inference",
    "CheckpointError": "toist_core.checkpoint",
    "ConfigError": "toist_core.typed_config",            # a bad InferenceConfig / config field
    "TextEncoderUnavailable": "toist_core.model.hub",   # the tokenizer neither cached nor reachable
    "ModelConfig": "toist_core.config",
    "InferenceConfig": "toist_core.config",
    "preset": "toist_core.config",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except AttributeError as exc:
            # `from toist_core import X` turns an AttributeError raised here into "cannot import
            # name X", cause and traceback lost (e.g. a too old library beside ours); an
            # ImportError passes through with both.
            raise ImportError(f"importing {_LAZY[name]} (for toist_core.{name}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        return getattr(module, name)
    raise AttributeError(f"module 'toist_core' has no attribute {name!r}")


def __dir__():
    # The lazy names too: tab completion and dir() showed none of the public API.
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY)
