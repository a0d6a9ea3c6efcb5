"""Adapters turn pixel features into label scores. All three are multi-label in one model
(binary is the one-label case) and share the interface of ``base.Adapter``."""
from .base import Adapter, TrainingPixels, sample_training_pixels
from .basic import BasicAdapter
from .classification import ClassificationAdapter
from .contrastive import ContrastiveAdapter
from .ensemble import EnsembleAdapter

ADAPTER_CLASSES = {cls.kind: cls for cls in (BasicAdapter, ClassificationAdapter, ContrastiveAdapter)}


def create_adapter(kind: str, **options) -> Adapter:
    return ADAPTER_CLASSES[kind](**options)


def adapter_from_state(state: dict) -> Adapter:
    if state["kind"] == EnsembleAdapter.kind:
        return EnsembleAdapter.from_state(state)
    return ADAPTER_CLASSES[state["kind"]].from_state(state)


__all__ = ["Adapter", "TrainingPixels", "sample_training_pixels", "BasicAdapter", "ClassificationAdapter",
           "ContrastiveAdapter", "EnsembleAdapter", "ADAPTER_CLASSES", "create_adapter", "adapter_from_state"]
