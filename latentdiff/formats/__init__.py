"""Model files above the models: native runs and exports, Stable Diffusion single files (.safetensors, .ckpt),
diffusers folders and bare components, each read into and written from one in-memory form.

One module per format (``native``, ``diffusers_component``, ``stable_diffusion`` for the original single file,
``diffusers_pipeline``, ``ckpt``), each with ``detect`` / ``read`` / ``write`` behind the registry
(``registry.FORMATS``, in detection order). The in-memory form is ``components.StableDiffusionComponents``; the
architecture of a file without our config is read from its shapes (``architecture``). Import from this package:
the modules behind it may move.
"""

from latentdiff.formats.architecture import infer_autoencoder_config, infer_clip_text_config, infer_unet_config
from latentdiff.formats.components import CheckpointFormat, ReadOptions, StableDiffusionComponents
from latentdiff.formats.diffusers_names import PARAMETERIZATIONS, SD_SCALE_FACTOR, UnsupportedArchitecture
from latentdiff.formats.diffusers_pipeline import save_diffusers
from latentdiff.formats.native import (
    build_latent_diffusion,
    load_autoencoder,
    load_latent_diffusion,
    native_conditioning,
    save_native,
)
from latentdiff.formats.registry import (
    FORMATS,
    convert,
    detect_format,
    load_stable_diffusion_weights,
    read_components,
    writable_formats,
    write_components,
)
from latentdiff.formats.stable_diffusion import ema_key, save_original, split_original, to_original_state_dict
from latentdiff.formats.weights import check_state_dict, read_state_dict, safe_torch_load

__all__ = [
    "FORMATS", "PARAMETERIZATIONS", "SD_SCALE_FACTOR", "CheckpointFormat", "ReadOptions", "StableDiffusionComponents",
    "UnsupportedArchitecture", "build_latent_diffusion", "check_state_dict", "convert", "detect_format", "ema_key",
    "infer_autoencoder_config", "infer_clip_text_config", "infer_unet_config", "load_autoencoder",
    "load_latent_diffusion", "load_stable_diffusion_weights", "native_conditioning", "read_components",
    "read_state_dict", "safe_torch_load", "save_diffusers", "save_native", "save_original", "split_original",
    "to_original_state_dict", "writable_formats", "write_components",
]
