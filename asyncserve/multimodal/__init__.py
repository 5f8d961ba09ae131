"""Images in prompts: decoded and checked (images.py), turned by the model's own image processor into
encoder inputs and placeholder tokens (processor.py), carried with the request as plain data (inputs.py)."""
from asyncserve.multimodal.inputs import ImageInput, MultiModalInputs

__all__ = ["ImageInput", "MultiModalInputs"]
